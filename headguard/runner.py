"""Turn (subject, check) pairs into result records. No pytest and no terminal here: the CLI, the pytest plugin and
`parametrize_with_checks` all go through these functions, so a check means the same thing everywhere."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import random
import shlex
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from hypothesis import settings

from headguard import profiles
from headguard.registry import CATALOGUE, Check, CheckContext, CheckFailure, CheckSkipped, load_catalogue
from headguard.subject import Subject

STATUSES = ("passed", "failed", "xfailed", "skipped", "error")


@dataclasses.dataclass
class CheckResult:
    """The verdict of one check on one subject. `started_at`/`finished_at` are `time.perf_counter()` readings,
    so callers can measure time to a verdict across checks; `exception` is kept for tracebacks, never serialised."""

    target: str
    name: str
    status: str
    duration_s: float
    message: str = ""
    example: str | None = None
    reproduce: str | None = None
    doc: str = ""
    where: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    exception: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict of every field but the exception."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "exception"}


class UnknownCheckError(KeyError):
    """A check name that is not in the catalogue; `str()` is one line with a suggestion."""

    def __str__(self) -> str:
        return self.args[0]


# --- which checks exist --------------------------------------------------------------------------------------------

_OVERRIDES: list[dict[str, Check]] = []


@contextlib.contextmanager
def using_catalogue(checks: Iterable[Check] | Mapping[str, Check]) -> Iterator[dict[str, Check]]:
    """Use `checks` instead of the registered catalogue inside the block (for tests of the harness itself); the
    global `CATALOGUE` is never touched."""
    table = dict(checks) if isinstance(checks, Mapping) else {c.name: c for c in checks}
    _OVERRIDES.append(table)
    try:
        yield table
    finally:
        _OVERRIDES.remove(table)


def known_checks() -> dict[str, Check]:
    """Every check by name: the innermost `using_catalogue` table, else the registered catalogue."""
    if _OVERRIDES:
        return _OVERRIDES[-1]
    load_catalogue()
    return CATALOGUE


def validate_names(names: Iterable[str], *, where: str) -> None:
    """Raise UnknownCheckError naming the first unknown check (and the closest known one)."""
    known = known_checks()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownCheckError(
                f"unknown check name {name!r} in {where}{hint} (`headguard list` shows all {len(known)} checks)"
            )


def select_checks(subject: Any, *, select: Sequence[str] = (), deselect: Sequence[str] = ()) -> list[Check]:
    """The checks that apply to `subject` (its kind and capabilities), in catalogue order, filtered by name."""
    validate_names([*select, *deselect], where="--select/--deselect")
    chosen = [c for c in known_checks().values() if c.applies_to(subject)]
    if select:
        chosen = [c for c in chosen if c.name in set(select)]
    return [c for c in chosen if c.name not in set(deselect)]


def not_applicable(subject: Subject, *, select: Sequence[str]) -> list[CheckResult]:
    """Skipped records for checks named in --select that need capabilities this subject lacks: naming a check and
    seeing nothing run would read as a pass."""
    known = known_checks()
    out = []
    for name in select:
        chk = known[name]
        if not chk.applies_to(subject):
            out.append(CheckResult(subject.name, name, "skipped", 0.0, doc=chk.doc,
                                   message=f"does not apply: {_why_not(chk, subject)}"))
    return out


def _why_not(chk: Check, subject: Subject) -> str:
    if chk.kind != subject.kind:
        return f"it checks a {chk.kind.replace('_', ' ')}, and {subject.name} is a {subject.kind.replace('_', ' ')}"
    missing = ", ".join(sorted(chk.requires - frozenset(subject.capabilities)))
    return f"needs capability {missing}, which {subject.name} lacks"


# --- running them ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hypothesis_profile(profile: str) -> Iterator[None]:
    """Load a headguard Hypothesis profile for the block and restore the caller's profile afterwards."""
    previous = settings.get_current_profile_name()
    profiles.load(profile)
    try:
        yield
    finally:
        settings.load_profile(previous)


def reproduce_command(target: str, name: str, *, seed: int, profile: str) -> str:
    return f"headguard check {shlex.quote(target)} --select {name} --seed {seed} --profile {profile}"


def run_checks(
    subject: Subject,
    checks: Iterable[Check],
    *,
    profile: str = "dev",
    seed: int = 0,
    on_start: Callable[[Subject, Check], None] | None = None,
    on_finish: Callable[[CheckResult], None] | None = None,
    exitfirst: bool = False,
    stop_when: Callable[[CheckResult], bool] | None = None,
) -> list[CheckResult]:
    """Run `checks` on `subject` in order under `profile`; one record per check. `on_start`/`on_finish` are called
    around each check (progress display, timing); `exitfirst` stops after the first failed or errored check,
    `stop_when(result)` after the first result it accepts."""
    results = []
    with hypothesis_profile(profile):
        for chk in checks:
            if on_start is not None:
                on_start(subject, chk)
            result = _run_one(subject, chk, profile=profile, seed=seed)
            results.append(result)
            if on_finish is not None:
                on_finish(result)
            if exitfirst and result.status in ("failed", "error"):
                break
            if stop_when is not None and stop_when(result):
                break
    return results


def run_check(subject: Subject, check: Check, *, profile: str = "dev", seed: int = 0) -> CheckResult:
    """Run a single check (the pytest plugin's item calls this)."""
    return run_checks(subject, [check], profile=profile, seed=seed)[0]


def _run_one(subject: Subject, chk: Check, *, profile: str, seed: int) -> CheckResult:
    reproduce = reproduce_command(subject.name, chk.name, seed=seed, profile=profile)
    result = CheckResult(subject.name, chk.name, "passed", 0.0, doc=chk.doc, reproduce=reproduce)
    seed_everything(seed)
    result.started_at = time.perf_counter()
    try:
        chk.func(subject, CheckContext(profile=profile, seed=seed))
    except CheckSkipped as exc:
        result.status, result.message = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001  (a crashing check is a verdict, not a crash of the runner)
        _record_exception(result, as_check_failure(exc))
    result.finished_at = time.perf_counter()
    result.duration_s = result.finished_at - result.started_at
    _apply_expected_failure(result, subject.expected_failures.get(chk.name))
    return result


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def as_check_failure(exc: BaseException) -> BaseException:
    """Hypothesis reports several distinct failures as an ExceptionGroup; when every one is a CheckFailure, merge
    them into one CheckFailure so that it counts as a failed property, not as an error."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        if leaves and all(isinstance(e, CheckFailure) for e in leaves):
            merged = CheckFailure(
                "\n".join(f"[{i}] {e.message}" for i, e in enumerate(leaves, 1)),
                example="\n".join(f"[{i}] {ex}" for i, e in enumerate(leaves, 1) if (ex := _example_of(e))) or None,
                reproduce=next((e.reproduce for e in leaves if e.reproduce), None),
            )
            merged.__traceback__ = leaves[0].__traceback__
            return merged
    return exc


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _record_exception(result: CheckResult, exc: BaseException) -> None:
    result.exception = exc
    if isinstance(exc, CheckFailure):
        result.status = "failed"
        result.message = exc.message
        result.example = _example_of(exc)
        result.reproduce = _merge_reproduce(result.reproduce, exc.reproduce)
        return
    result.status = "error"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    result.message = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    result.example = hypothesis_example(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        result.where = f"{last.filename}:{last.lineno} in {last.name}" + (f": {last.line}" if last.line else "")


def _merge_reproduce(command: str, given: str | None) -> str:
    """A check's own headguard command replaces ours; other hints (a @reproduce_failure blob) follow ours."""
    if not given or given.strip() == command:
        return command
    if given.lstrip().startswith("headguard "):
        return given.strip()
    return f"{command}\n{given.strip()}"


def _example_of(exc: CheckFailure) -> str | None:
    return exc.example or hypothesis_example(exc)


def hypothesis_example(exc: BaseException) -> str | None:
    """The "Falsifying example: ..." note Hypothesis attached to `exc` ("Failing test case: ..." in newer
    releases), with any note() lines after it; None when Hypothesis found nothing. The explanation of covered lines
    and the @reproduce_failure blob are left out: the reproduce command replaces them."""
    notes = [str(n) for n in getattr(exc, "__notes__", ())]
    start = next((i for i, n in enumerate(notes) if n.startswith(_EXAMPLE_PREFIXES)), None)
    if start is None:
        return None
    kept = [notes[start]]
    for note in notes[start + 1:]:
        if note.startswith("Explanation:") or "reproduce this" in note or note.startswith(_EXAMPLE_PREFIXES):
            break
        kept.append(note)
    return "\n".join(kept)


_EXAMPLE_PREFIXES = ("Falsifying example", "Failing test case", "Falsifying explicit example")


def _apply_expected_failure(result: CheckResult, reason: str | None) -> None:
    """Strict expected failures, as pytest's xfail_strict: failing -> xfailed, passing -> failed."""
    if reason is None:
        return
    if result.status == "failed":
        result.status = "xfailed"
        result.message = f"expected failure: {reason}\nthe check said: {result.message}"
    elif result.status == "passed":
        result.status = "failed"
        result.message = f"expected to fail because {reason}, but passed: remove it from expected_failures"
    elif result.status == "error":
        result.message += f" (expected to fail because {reason}, but raised an error instead of failing)"
