"""Turn (subject, check) pairs into result records. No pytest and no terminal here: the CLI, the pytest plugin and
`parametrize_with_checks` all go through these functions, so a check means the same thing everywhere."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import shlex
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from hypothesis import settings

from headguard import profiles
from headguard.errors import UsageError
from headguard.failures import Failure, failures_of, from_group, hypothesis_example
from headguard.isolation import CheckTimeout, is_out_of_memory, isolated_torch_state, seed_everything, time_limit
from headguard.registry import CATALOGUE, Check, CheckContext, CheckFailure, CheckSkipped, load_catalogue
from headguard.subject import ExpectedFailure, Subject

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
    # Every distinct failure of a failed check, each with its own (shrunk) example; `message` and `example` hold
    # the only one, or all of them as "[1] ...", "[2] ..." lines.
    failures: list[Failure] = dataclasses.field(default_factory=list)
    where: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    # Curves the check recorded (name -> series -> values), and the files a face drew from them (--plots).
    series: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    artifacts: list[str] = dataclasses.field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    exception: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict of every field but the exception."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "exception"}
        record["failures"] = [dataclasses.asdict(f) for f in self.failures]
        return record


class UnknownCheckError(UsageError, KeyError):
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
    """The checks that apply to `subject` (its kind and capabilities), in catalogue order, filtered by name, with the
    subject's gates (the output contract) first whenever anything is chosen, selected or not, unless deselected:
    the other checks read what the gate checks."""
    validate_names([*select, *deselect], where="--select/--deselect")
    applicable = [c for c in known_checks().values() if c.applies_to(subject) and c.name not in set(deselect)]
    chosen = [c for c in applicable if not select or c.name in set(select)]
    if not chosen:
        return []
    gates = [c for c in applicable if c.gate]
    return gates + [c for c in chosen if c not in gates]


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


def time_limit_for(subject: Any, profile: str, timeout: float | None = None) -> float | None:
    """Seconds each check may run: the run's `timeout` if given, else the subject's own, else the profile's."""
    if timeout is not None:
        return timeout
    return getattr(subject, "timeout", None) or profiles.TIME_LIMITS_S[profile]


def run_checks(
    subject: Subject,
    checks: Iterable[Check],
    *,
    profile: str = "dev",
    seed: int = 0,
    timeout: float | None = None,
    on_start: Callable[[Subject, Check], None] | None = None,
    on_finish: Callable[[CheckResult], None] | None = None,
    exitfirst: bool = False,
    stop_when: Callable[[CheckResult], bool] | None = None,
) -> list[CheckResult]:
    """Run `checks` on `subject` in order under `profile`; one record per check. `on_start`/`on_finish` are called
    around each check (progress display, timing); `exitfirst` stops after the first failed or errored check,
    `stop_when(result)` after the first result it accepts.

    A gate among `checks` (registered with `gate=True`, such as the output contract; `select_checks` puts them
    first) that fails is reported, and every check after it is reported skipped, naming it: one clear verdict
    instead of the same malformed output failing every check that reads it. A KeyboardInterrupt propagates after
    the records of the finished checks have been handed to `on_finish`.
    """
    checks = list(checks)
    limit = time_limit_for(subject, profile, timeout)
    results: list[CheckResult] = []
    blocked_by: CheckResult | None = None
    with hypothesis_profile(profile):
        for chk in checks:
            if blocked_by is not None:
                result = _skipped_behind(subject, chk, blocked_by)
            else:
                if on_start is not None:
                    on_start(subject, chk)
                result = _run_one(subject, chk, profile=profile, seed=seed, time_limit_s=limit)
                if chk.gate and result.status in ("failed", "error"):
                    blocked_by = result
            results.append(result)
            if on_finish is not None:
                on_finish(result)
            if exitfirst and result.status in ("failed", "error"):
                break
            if stop_when is not None and stop_when(result):
                break
    return results


def run_check(
    subject: Subject, check: Check, *, profile: str = "dev", seed: int = 0, timeout: float | None = None
) -> CheckResult:
    """Run one check behind the subject's gates (see `select_checks`): its record, skipped naming the gate when a
    gate failed. The pytest plugin's items and `parametrize_with_checks` call this."""
    known = known_checks()
    if known.get(check.name) is not check:  # a check from outside the catalogue: nothing gates it
        return run_checks(subject, [check], profile=profile, seed=seed, timeout=timeout)[0]
    chain = select_checks(subject, select=[check.name]) or [check]
    return run_checks(subject, chain, profile=profile, seed=seed, timeout=timeout)[-1]


def _skipped_behind(subject: Subject, chk: Check, gate: CheckResult) -> CheckResult:
    summary = (gate.message.splitlines() or [""])[0]
    return CheckResult(subject.name, chk.name, "skipped", 0.0, doc=chk.doc,
                       message=f"not run because {gate.name} failed: {summary}")


def _run_one(subject: Subject, chk: Check, *, profile: str, seed: int, time_limit_s: float | None) -> CheckResult:
    reproduce = reproduce_command(subject.name, chk.name, seed=seed, profile=profile)
    result = CheckResult(subject.name, chk.name, "passed", 0.0, doc=chk.doc, reproduce=reproduce)
    with isolated_torch_state() as changed:
        seed_everything(seed)
        result.started_at = time.perf_counter()
        ctx = CheckContext(profile=profile, seed=seed)
        try:
            with time_limit(time_limit_s):
                chk(subject, ctx)
        except CheckSkipped as exc:
            result.status, result.message = "skipped", str(exc)
        except CheckTimeout as exc:
            result.status, result.where = "failed", exc.where
            result.message = (f"{chk.name} {exc}: the head or loss hangs or is far slower than expected (if it is "
                              "only slow, raise --timeout or HeadSpec(timeout=...))")
            result.failures = [Failure(result.message)]
        except SystemExit as exc:
            result.status = "error"
            result.message = (f"the subject called sys.exit({exc.code!r}) during the check; a head or loss must "
                              "raise an exception, never exit the process")
        except Exception as exc:  # noqa: BLE001  (a crashing check is a verdict, not a crash of the runner)
            _record_exception(result, as_check_failure(exc))
        result.finished_at = time.perf_counter()
    result.series = ctx.series
    if changed:
        result.notes.append(f"the check's run of the subject changed global torch state ({'; '.join(changed)}); "
                            "headguard restored it: a head or loss must not change process-wide settings")
    result.duration_s = result.finished_at - result.started_at
    _apply_expected_failure(result, subject.expected_failures.get(chk.name))
    return result


def as_check_failure(exc: BaseException) -> BaseException:
    """Hypothesis reports several distinct failures as an ExceptionGroup; when every one is a CheckFailure, they are
    one failed property (`DistinctFailures`, each failure with its own example), not an error."""
    if isinstance(exc, BaseExceptionGroup):
        return from_group(exc) or exc
    return exc


def _record_exception(result: CheckResult, exc: BaseException) -> None:
    result.exception = exc
    if _out_of_memory(exc):
        result.status = "error"
        result.message = (f"out of memory ({type(exc).__name__}: {_first_line(exc)}): a resource limit of this "
                          "machine, not a property of the subject; check a smaller configuration (head_kwargs)")
        return
    if isinstance(exc, CheckFailure):
        result.status = "failed"
        result.failures = list(failures_of(exc))
        result.message = exc.message
        result.example = _example_of(exc)
        result.reproduce = _merge_reproduce(result.reproduce, exc.reproduce)
        return
    result.status = "error"
    first_line = _first_line(exc)
    result.message = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    result.example = hypothesis_example(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        result.where = f"{last.filename}:{last.lineno} in {last.name}" + (f": {last.line}" if last.line else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure anywhere in the exception: itself, a cause, or a leaf of an exception group."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_out_of_memory(exc):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(_out_of_memory(e) for e in exc.exceptions)
        exc = exc.__cause__
    return False


def _merge_reproduce(command: str, given: str | None) -> str:
    """A check's own headguard command replaces ours; other hints (a @reproduce_failure blob) follow ours."""
    if not given or given.strip() == command:
        return command
    if given.lstrip().startswith("headguard "):
        return given.strip()
    return f"{command}\n{given.strip()}"


def _example_of(exc: CheckFailure) -> str | None:
    return exc.example or hypothesis_example(exc)


def _apply_expected_failure(result: CheckResult, declared: ExpectedFailure | str | None) -> None:
    """Strict expected failures, as pytest's xfail_strict: failing for the declared cause -> xfailed, passing ->
    failed, failing for another cause -> failed, saying so."""
    if declared is None or result.status == "skipped":
        return
    expected = ExpectedFailure.of(declared)
    reason = expected.reason
    if _covered(expected, result):
        result.status = "xfailed"
        result.message = f"expected failure: {reason}\nthe check said: {result.message}"
    elif result.status == "passed":
        result.status = "failed"
        result.message = f"expected to fail because {reason}, but passed: remove it from expected_failures"
    elif result.status == "failed":
        result.message += (f"\n(an expected failure is declared for this check, {reason!r}, but this failure does not "
                           f"match its cause {expected.match!r}: a different bug)")
    elif result.status == "error":
        result.message += f" (expected to fail because {reason}, but raised an error instead of failing)"


def _covered(expected: ExpectedFailure, result: CheckResult) -> bool:
    """Every distinct failure is of the declared cause: a second bug is never xfailed behind a known one."""
    messages = [f.message for f in result.failures] or [result.message]
    return all(expected.covers(result.status, message, result.exception) for message in messages)
