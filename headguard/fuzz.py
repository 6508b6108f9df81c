"""`headguard fuzz`: run the checks round-robin until a time budget is spent, each run with a fresh seed.

HypoFuzz is not used: it fuzzes the `@given` tests pytest collects, and a check builds its properties inside the
check (bound to the subject), so there is nothing for it to collect; its licence is not an open-source one either.

Each round runs every live check once, with seed `seed + round` (the subjects keep the weights of `seed`), under
the fuzz profile and the example database. A check's run gets an equal slice of the budget: its property starts no
example past the slice's end (one that has failed still shrinks, within the check's time limit). A check that
fails, errors, is skipped or is an expected failure leaves the rotation: running it again finds nothing new.
No terminal here: `on_finish` reports progress, and the CLI prints.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

from headguard import engine
from headguard.registry import Check
from headguard.runner import CheckResult, run_check
from headguard.subject import Subject

# A slice shorter than this spends its time building heads, not drawing examples.
MIN_SLICE_S = 2.0


@dataclasses.dataclass
class Tally:
    """What the fuzzing of one check on one target came to."""

    target: str
    name: str
    runs: int = 0
    examples: int = 0
    seconds: float = 0.0
    last: CheckResult | None = None

    @property
    def status(self) -> str:
        return self.last.status if self.last is not None else "not run"


@dataclasses.dataclass
class Run:
    """One finished run of a check: the record and the seed it ran with."""

    result: CheckResult
    seed: int
    examples: int
    round: int


@dataclasses.dataclass
class Summary:
    tallies: list[Tally]
    runs: list[Run]
    rounds: int
    elapsed_s: float
    interrupted: bool = False

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.result.status in ("failed", "error")]


def fuzz(
    plan: Sequence[tuple[Subject, Sequence[Check]]],
    *,
    budget_s: float,
    profile: str,
    seed: int = 0,
    timeout: float | None = None,
    database=engine.DEFAULT,
    on_finish: Callable[[Run], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Summary:
    """Fuzz every (subject, check) of `plan` for `budget_s` seconds; KeyboardInterrupt ends it with what finished."""
    start = clock()
    deadline = start + budget_s
    tallies = {(s.name, c.name): Tally(s.name, c.name) for s, checks in plan for c in checks}
    slice_s = max(budget_s / max(1, len(tallies)), MIN_SLICE_S)
    runs: list[Run] = []
    live = set(tallies)
    rounds = 0
    interrupted = False
    try:
        while live and clock() < deadline:
            for subject, chk in [(s, c) for s, checks in plan for c in checks if (s.name, c.name) in live]:
                if clock() >= deadline:
                    break
                run = _run_once(subject, chk, profile=profile, seed=seed + rounds, timeout=timeout, round_=rounds,
                                database=database, deadline=min(deadline, clock() + slice_s))
                _add(tallies[subject.name, chk.name], run)
                runs.append(run)
                if run.result.status != "passed":
                    live.discard((subject.name, chk.name))
                if on_finish is not None:
                    on_finish(run)
            rounds += 1
    except KeyboardInterrupt:
        interrupted = True
    return Summary(list(tallies.values()), runs, rounds, clock() - start, interrupted)


def _run_once(subject, chk, *, profile, seed, timeout, round_, database, deadline) -> Run:
    tally: collections.Counter = collections.Counter()
    with engine.options(database=database, deadline=deadline, tally=tally):
        result = run_check(subject, chk, profile=profile, seed=seed, timeout=timeout)
    return Run(result, seed, tally[chk.name], round_)


def _add(tally: Tally, run: Run) -> None:
    tally.runs += 1
    tally.examples += run.examples
    tally.seconds += run.result.duration_s
    tally.last = run.result


def format_summary(summary: Summary) -> str:
    """A line per check (runs, examples tried, seconds, last verdict), then the totals."""
    width = max((len(t.name) for t in summary.tallies), default=0)
    lines = [f"fuzzed for {summary.elapsed_s:.1f}s: {summary.rounds} round(s)"
             + (" (interrupted)" if summary.interrupted else "")]
    for target in dict.fromkeys(t.target for t in summary.tallies):
        lines.append(f"{target}")
        for t in (t for t in summary.tallies if t.target == target):
            lines.append(f"  {t.status:<8} {t.name:<{width}}  {t.runs:3d} run(s) {t.examples:6d} examples "
                         f"{t.seconds:7.1f}s")
    checks_run = sum(1 for t in summary.tallies if t.runs)
    examples = sum(t.examples for t in summary.tallies)
    lines.append(f"{checks_run} check(s) run, {len(summary.runs)} run(s), {examples} examples, "
                 f"{len(summary.failed)} failure(s)")
    return "\n".join(lines) + "\n"


__all__ = ["MIN_SLICE_S", "Run", "Summary", "Tally", "format_summary", "fuzz"]
