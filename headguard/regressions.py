"""`--save-regressions DIR`: each failure a check found, written as a pytest file to commit beside the code.

A file replays the failure's own input: the `@reproduce_failure` blob Hypothesis printed for it (the shrunk example
is quoted in the docstring for the reader), on the subject built from the same seed, with the check's seed. It fails
while the bug is there and passes once it is fixed (an input on which the property now holds passes). A blob only
replays under the Hypothesis version that wrote it; under another version, and for a check that draws nothing, the
file runs the check from the same seeds instead.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap
import unittest
from collections.abc import Iterable

import hypothesis

from headguard import engine, report
from headguard.failures import Failure, find_replay, parse_replay, replay_decorator
from headguard.runner import CheckResult, known_checks, run_check
from headguard.targets import resolve_target


@dataclasses.dataclass(frozen=True)
class Found:
    """A failed record and the seeds it ran with: `subject_seed` built the subject, `seed` ran the check."""

    result: CheckResult
    seed: int
    subject_seed: int
    profile: str


def write_regressions(directory: str | pathlib.Path, found: Iterable[Found]) -> list[pathlib.Path]:
    """One file per distinct failure of every failed or errored record; returns the paths written."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for item in found:
        if item.result.status not in ("failed", "error"):
            continue
        failures = _failures(item.result)
        for index, failure in enumerate(failures, 1):
            stem = _identifier(f"{item.result.target}_{item.result.name}")
            if len(failures) > 1:
                stem += f"_{index}"
            path = out / f"test_{stem}.py"
            path.write_text(render(item, failure, test_name=f"test_{stem}"), encoding="utf-8")
            written.append(path)
    return written


def _failures(result: CheckResult) -> list[Failure]:
    """The record's distinct failures; an error (or a failure the runner reported itself) as the one."""
    if result.failures:
        return result.failures
    replay = replay_decorator(result.exception) if result.exception is not None else None
    return [Failure(result.message, result.example, replay or find_replay(result.reproduce or ""))]


def _identifier(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")


def render(item: Found, failure: Failure, *, test_name: str) -> str:
    """The source of one regression file."""
    result = item.result
    example = "None"
    if failure.replay:
        version, blob = parse_replay(failure.replay)
        example = f"({version!r}, {blob!r})"
    quoted = textwrap.indent(failure.example or "(the check draws nothing: its seeded input)", "    ")
    message = textwrap.indent(failure.message, "    ")
    doc = _docstring(f"""Regression test written by `headguard --save-regressions`: {result.name} on {result.target}.

property: {result.doc}
found:
{message}
example:
{quoted}

It replays that input and fails while the bug is there; it passes once the bug is fixed.""")
    return f'''{doc}

from headguard.regressions import replay


def {test_name}():
    replay({result.target!r}, {result.name!r}, seed={item.seed}, subject_seed={item.subject_seed},
           profile={item.profile!r}, example={example})
'''


def _docstring(text: str) -> str:
    """`text` as a module docstring that says exactly `text` (backslashes and triple quotes escaped)."""
    return '"""' + text.replace("\\", "\\\\").replace('"""', '\\"""') + '\n"""'


def replay(target: str, check: str, *, seed: int, subject_seed: int, profile: str,
           example: tuple[str, bytes] | None = None) -> None:
    """Run `check` on `target` (built from `subject_seed`) with `seed`, on the recorded input `example` (Hypothesis
    version, blob) where this Hypothesis can replay it; raise AssertionError with the report when it fails, skip
    when the check does not apply here."""
    __tracebackhide__ = True
    subject = resolve_target(target, seed=subject_seed)
    replayed = None
    if example is not None and example[0] == hypothesis.__version__:
        replayed = engine.Replay(check, *example)
    with engine.options(replay=replayed, database=None):
        result = run_check(subject, known_checks()[check], profile=profile, seed=seed)
    if result.status == "skipped":
        raise unittest.SkipTest(result.message)  # pytest reports it as skipped
    if result.status in ("failed", "error"):
        raise AssertionError(report.format_failure(result))


__all__ = ["Found", "render", "replay", "write_regressions"]
