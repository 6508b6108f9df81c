"""`check_head`: the catalogue on one head or shape loss in one call, as scikit-learn's `check_estimator`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from headguard.runner import CheckResult, run_checks, select_checks
from headguard.targets import subject_from


def check_head(
    subject: Any,
    *,
    select: Sequence[str] = (),
    deselect: Sequence[str] = (),
    profile: str = "ci",
    seed: int = 0,
    timeout: float | None = None,
) -> list[CheckResult]:
    """Run every applicable check on `subject` (a head class, a `HeadSpec`, a shape loss or a `ShapeLossSpec`) and
    return the records, as `headguard check` would report them. Raises a `headguard.UsageError` for a subject that
    cannot be set up; a failing check is a record with status "failed", never an exception."""
    built = subject_from(subject, seed=seed, timeout=timeout)
    return run_checks(built, select_checks(built, select=select, deselect=deselect), profile=profile, seed=seed,
                      timeout=timeout)
