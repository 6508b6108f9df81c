"""The catalogue of checks: a registry of named properties, each gated on the capabilities it needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

# Each area's checks apply to one kind of subject: a head with its loss and training step, or a standalone shape loss.
AREA_KINDS = {"head": "head", "forward": "head", "loss": "head", "training": "head", "shape_loss": "shape_loss"}
AREAS = tuple(AREA_KINDS)


class CheckFailure(AssertionError):
    """A property does not hold. `message` is written for the head's author; `example` is the (shrunk) input."""

    def __init__(self, message: str, *, example: str | None = None, reproduce: str | None = None):
        super().__init__(message)
        self.message = message
        self.example = example
        self.reproduce = reproduce


class CheckSkipped(Exception):
    """The check does not apply here (for example, no CUDA device); the reason says why."""


@dataclasses.dataclass(frozen=True)
class CheckContext:
    """What a check may use besides the subject: the Hypothesis profile, a base seed, and `record` for curves worth
    showing a person (the runner copies them into the check's result; `headguard check --plots DIR` draws them)."""

    profile: str = "dev"
    seed: int = 0
    series: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict, compare=False)

    def record(self, name: str, curves: dict[str, list[float]]) -> None:
        """Keep `curves` (series name -> one value per step) under `name`, for the report."""
        self.series[name] = {key: [float(v) for v in values] for key, values in curves.items()}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    area: str
    func: Callable[[Any, CheckContext], None]
    requires: frozenset[str]
    doc: str
    # A gate is a precondition of every other check of its kind (the output contract): when it fails, the runner
    # reports the others skipped instead of running them on outputs they cannot read.
    gate: bool = False

    @property
    def kind(self) -> str:
        """The kind of subject this check applies to ("head" or "shape_loss"), fixed by its area."""
        return AREA_KINDS[self.area]

    def applies_to(self, subject: Any) -> bool:
        """True for a subject of this check's kind that has every capability the check requires."""
        return subject.kind == self.kind and self.requires <= frozenset(subject.capabilities)

    def __call__(self, subject, ctx: CheckContext | None = None) -> None:
        self.func(subject, ctx or CheckContext())


CATALOGUE: dict[str, Check] = {}


def check(*, area: str, requires: Iterable[str] = (), name: str | None = None, gate: bool = False):
    """Register `func(subject, ctx)` as a check. Its name is the function name unless given; `gate=True` makes it a
    precondition of the other checks of its kind (see `Check.gate`)."""
    if area not in AREAS:
        raise ValueError(f"Expected area in {AREAS}, got area={area!r}")

    def register(func):
        key = name or func.__name__
        if key in CATALOGUE:
            raise ValueError(f"a check named {key!r} is already registered")
        doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
        CATALOGUE[key] = Check(key, area, func, frozenset(requires), doc, gate)
        return func

    return register


def load_catalogue() -> None:
    """Register every built-in check (idempotent: the import runs once)."""
    from headguard import checks  # noqa: F401  (importing the package registers every check)
