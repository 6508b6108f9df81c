"""What a check can end in, and what it is given besides the subject: CheckFailure (a property is false),
CheckSkipped (it does not apply) and CheckContext. A leaf module: the registry, the property engine and the
failures module all build on it."""

from __future__ import annotations

import dataclasses


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


__all__ = ["CheckContext", "CheckFailure", "CheckSkipped"]
