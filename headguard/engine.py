"""What the faces ask of every property a block of checks runs (`properties.run_property` reads it): the example
database, a deadline between examples, an input to replay, and a tally of the examples tried.

They are context variables rather than arguments of `runner.run_checks`, so that the CLI, the pytest plugin, the
fuzz loop and a regression file can set them around the runner without every layer in between passing them on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

# `database` left at DEFAULT: the directory database for a randomised profile, none for a derandomized one.
DEFAULT: Any = type("Default", (), {"__repr__": lambda self: "DEFAULT"})()


@dataclasses.dataclass(frozen=True)
class Options:
    """`database`: a Hypothesis ExampleDatabase, None (off) or DEFAULT. `deadline`: a `time.monotonic()` reading
    after which no property starts another example (one that has failed still shrinks). `replay`: the one input
    the named check's property runs instead of a search. `tally`: examples tried, counted by check name."""

    database: Any = DEFAULT
    deadline: float | None = None
    replay: Replay | None = None
    tally: collections.Counter | None = None


@dataclasses.dataclass(frozen=True)
class Replay:
    """A `@reproduce_failure(version, blob)` input for the property of `check` (a regression file replays it)."""

    check: str
    version: str
    blob: bytes


@dataclasses.dataclass(frozen=True)
class PropertyKey:
    """Which property of which subject is running, the key of its examples in the database: subject (the TARGET),
    check, and the variant (the property's occurrence in that check, `inner#0`)."""

    subject: str
    check: str
    variant: str

    def __str__(self) -> str:
        return f"{self.subject}::{self.check}[{self.variant}]"


_OPTIONS: ContextVar[Options] = ContextVar("headguard_engine_options", default=Options())
_CHECK: ContextVar[tuple[str, str, Iterator[int]] | None] = ContextVar("headguard_engine_check", default=None)


def current() -> Options:
    return _OPTIONS.get()


@contextlib.contextmanager
def options(**changes: Any) -> Iterator[Options]:
    """Run the block with these options changed (the rest as the enclosing block set them)."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def checking(subject: str, check: str) -> Iterator[None]:
    """Mark the block as one run of `check` on `subject`, so that each property it runs gets its own key."""
    token = _CHECK.set((subject, check, itertools.count()))
    try:
        yield
    finally:
        _CHECK.reset(token)


def next_key(variant: str) -> PropertyKey:
    """The key of the next property of the running check; outside `checking`, keyed by `variant` alone."""
    running = _CHECK.get()
    if running is None:
        return PropertyKey("", "", variant)
    subject, check, counter = running
    return PropertyKey(subject, check, f"{variant}#{next(counter)}")


def past_deadline() -> bool:
    deadline = _OPTIONS.get().deadline
    return deadline is not None and time.monotonic() >= deadline


def count_example(key: PropertyKey) -> None:
    tally = _OPTIONS.get().tally
    if tally is not None:
        tally[key.check or key.variant] += 1


__all__ = ["DEFAULT", "Options", "PropertyKey", "Replay", "checking", "count_example", "current", "next_key", "options",
           "past_deadline"]
