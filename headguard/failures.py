"""The distinct failures of one check: what Hypothesis reports about each (its shrunk example, the blob that replays
it) read from the notes it attaches, and the exception that carries several of them as one CheckFailure."""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator, Sequence

from headguard.outcomes import CheckFailure

_EXAMPLE_PREFIXES = ("Falsifying example", "Failing test case", "Falsifying explicit example")
_REPLAY = re.compile(r"@reproduce_failure\((?P<version>'[^']*'|\"[^\"]*\"), (?P<blob>b'[^']*'|b\"[^\"]*\")\)")


@dataclasses.dataclass(frozen=True)
class Failure:
    """One distinct failure of a check: the message for the head's author, the (shrunk) example, and `replay`, the
    `@reproduce_failure(...)` decorator that replays its input under the Hypothesis version that found it."""

    message: str
    example: str | None = None
    replay: str | None = None

    @classmethod
    def of(cls, exc: CheckFailure) -> Failure:
        return cls(exc.message, exc.example or hypothesis_example(exc), replay_decorator(exc))


class DistinctFailures(CheckFailure):
    """Several distinct failures of one property, each shrunk on its own (Hypothesis tells bugs apart by exception
    type and line), as one CheckFailure, so they count as a failed property: `message` and `example` list them all
    (`[1] ...`, `[2] ...`), `failures` holds each."""

    def __init__(self, failures: Sequence[Failure], *, reproduce: str | None = None):
        if not failures:
            raise ValueError("Expected at least one failure, got failures=[]")
        self.failures = tuple(failures)
        super().__init__(
            "\n".join(f"[{i}] {f.message}" for i, f in enumerate(self.failures, 1)),
            example="\n".join(f"[{i}] {f.example}" for i, f in enumerate(self.failures, 1) if f.example) or None,
            reproduce=reproduce or next((f.replay for f in self.failures if f.replay), None),
        )


def failures_of(exc: CheckFailure) -> tuple[Failure, ...]:
    """Each distinct failure an exception reports: all of a DistinctFailures, else the one."""
    return exc.failures if isinstance(exc, DistinctFailures) else (Failure.of(exc),)


def leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    """The exceptions of a (nested) exception group, depth first."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc


def from_group(group: BaseExceptionGroup) -> CheckFailure | None:
    """A group whose every leaf is a CheckFailure as one CheckFailure (the only one, or DistinctFailures); None when
    any leaf is another exception (a crash, which stays an error)."""
    found = list(leaves(group))
    if not found or not all(isinstance(e, CheckFailure) for e in found):
        return None
    if len(found) == 1:
        return with_example(found[0])
    merged = DistinctFailures([f for e in found for f in failures_of(e)],
                              reproduce=next((e.reproduce for e in found if e.reproduce), None))
    merged.__traceback__ = found[0].__traceback__
    return merged


def with_example(err: CheckFailure) -> CheckFailure:
    """`err` as a plain CheckFailure whose `example` and `reproduce` are read from the notes Hypothesis attached."""
    notes = [str(n) for n in getattr(err, "__notes__", ())]
    reproduce = "\n".join(n.strip() for n in notes if "reproduce_failure" in n) or err.reproduce
    return CheckFailure(err.message, example=hypothesis_example(err) or err.example, reproduce=reproduce)


def hypothesis_example(exc: BaseException) -> str | None:
    """The "Falsifying example: ..." note Hypothesis attached to `exc` ("Failing test case: ..." when the shrink
    phase is off, reported under the one name), with any note() lines after it; None when Hypothesis found
    nothing. The explanation of covered lines and the @reproduce_failure blob are left out: the reproduce command
    replaces them."""
    notes = [str(n) for n in getattr(exc, "__notes__", ())]
    start = next((i for i, n in enumerate(notes) if n.startswith(_EXAMPLE_PREFIXES)), None)
    if start is None:
        return None
    kept = [notes[start].replace("Failing test case:", "Falsifying example:", 1)]
    for note in notes[start + 1:]:
        if note.startswith("Explanation:") or "reproduce this" in note or note.startswith(_EXAMPLE_PREFIXES):
            break
        kept.append(note)
    return "\n".join(kept)


def replay_decorator(exc: BaseException) -> str | None:
    """`@reproduce_failure('<version>', b'<blob>')` from Hypothesis' note on `exc` (or its `reproduce`), or None."""
    texts = [str(n) for n in getattr(exc, "__notes__", ())] + [getattr(exc, "reproduce", None) or ""]
    return find_replay("\n".join(texts))


def find_replay(text: str) -> str | None:
    """The first `@reproduce_failure('<version>', b'<blob>')` in `text`, or None."""
    found = _REPLAY.search(text)
    return found.group(0) if found else None


def parse_replay(decorator: str) -> tuple[str, bytes]:
    """(version, blob) of a `@reproduce_failure(...)` decorator as `replay_decorator` returns it."""
    found = _REPLAY.search(decorator)
    if found is None:
        raise ValueError(f"Expected @reproduce_failure('<version>', b'<blob>'), got {decorator!r}")
    return ast.literal_eval(found["version"]), ast.literal_eval(found["blob"])


__all__ = [
    "DistinctFailures", "Failure", "failures_of", "find_replay", "from_group", "hypothesis_example", "leaves", "parse_replay",
    "replay_decorator", "with_example",
]
