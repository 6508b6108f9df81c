"""The property engine: how a registered check runs. Once for every check it pins torch to one intra-op thread,
keys the check's examples (`engine.checking`), runs each declared variant, and, for a check that declares inputs,
binds their strategies to the subject and searches them under the profile, seed and example database the faces set.

`run_property` is the search itself, also open to a check that runs more than one property: a CheckFailure comes
back with its shrunk example, several distinct ones as `DistinctFailures`, and a crash ends the search at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from hypothesis import Phase, example, given, reproduce_failure, seed, settings
from hypothesis.database import ExampleDatabase
from hypothesis.errors import DidNotReproduce, FlakyStrategyDefinition, HypothesisException

from headguard import engine
from headguard.database import KeyedDatabase, open_database
from headguard.failures import DistinctFailures, Failure, failures_of, from_group, with_example
from headguard.outcomes import CheckContext, CheckFailure
from headguard.profiles import canonical, settings_for


# ------------------------------------------------------------------------------------------------ running a check
def execute(check, subject, ctx: CheckContext) -> None:
    """Run registered `check` (a `registry.Check`) on `subject`: every variant, each with its declared inputs
    drawn; the failures of all variants are reported together, each named by its variant's call."""
    with single_threaded(), engine.checking(getattr(subject, "name", ""), check.name):
        failures = []
        for variant in check.variants:
            try:
                _run_variant(check, subject, ctx, variant)
            except CheckFailure as err:
                if not variant.values:
                    raise
                failures.extend(_named(f, variant.call(check.name)) for f in failures_of(with_example(err)))
        if len(failures) == 1:
            raise CheckFailure(failures[0].message, example=failures[0].example, reproduce=failures[0].replay)
        if failures:
            raise DistinctFailures(failures)


def _named(failure: Failure, call: str) -> Failure:
    return Failure(f"{call}: {failure.message}", failure.example, failure.replay)


def _run_variant(check, subject, ctx: CheckContext, variant) -> None:
    fixed = dict(variant.values)
    if not check.inputs:
        check.body(subject, ctx, **fixed)
        return
    strategies = {name: declared.strategy(subject) for name, declared in check.inputs.items()}
    examples = [{name: check.inputs[name].example(subject, value) for name, value in chosen.items()}
                for chosen in check.examples]
    prop = _property_of(check, subject, ctx, fixed)
    # A gate is every other check's precondition, not the object of a search: its count is the same in every profile.
    run_property(ctx, prop, examples=examples, max_examples=check.max_examples, scale_count=not check.gate,
                 variant=variant.call("drawn") if fixed else "drawn", **strategies)


def _property_of(check, subject, ctx, fixed: Mapping[str, Any]) -> Callable[..., None]:
    """`check.body` with the subject, context and variant bound: a function of the drawn inputs alone, named after
    the check, so that a falsifying example reads `check_x(feats=..., init=...)`."""

    def prop(**drawn):
        check.body(subject, ctx, **drawn, **fixed)

    prop.__name__ = prop.__qualname__ = check.name
    prop.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in check.inputs])
    return prop


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the block. Checks use tiny tensors, where intra-op threading costs more than it
    gains; on a shared 2-core CPU it is ruinous (measured: 10 train+eval forwards of Detect, batch 3, 64 px: 6.5 s
    with 2 threads, 0.18 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------------- the search
def scaled_count(ci_count: int, profile_count: int) -> int:
    """A property's example count under a profile whose properties get `profile_count` examples, for one that gets
    `ci_count` under headguard-ci: in proportion, at least 1, never more than the profile's own count."""
    ci = settings_for("headguard-ci").max_examples
    return max(1, min(profile_count, round(ci_count * profile_count / ci)))


def run_property(ctx: CheckContext, inner: Callable, *strategies, max_examples: int | None = None, scale_count: bool = True,
                 examples: Sequence[Mapping[str, Any]] = (), variant: str | None = None, **kw) -> None:
    """Run `inner(*drawn)` under the active profile (seeded with ctx.seed), with the example database and the other
    options the faces set (`headguard.engine`). `max_examples` is a costly property's count in `headguard-ci`;
    another profile scales it by its own count over ci's (so `headguard-fuzz` explores it 100 times as long), unless
    `scale_count` is False;
    `examples` are tried first (keyword inputs, one dict each); `variant` names the property in the database
    (default: inner's name).

    A CheckFailure comes back with Hypothesis' "Falsifying example" note as `example`; several distinct ones, each
    shrunk on its own, as `DistinctFailures`. A crash (the subject or the check raised: an exception that is not a
    CheckFailure, or a CheckFailure raised from one, as `call` does) ends the search at once, unshrunk: exploring
    and shrinking an exception costs tens of seconds and says no more than the first one.
    """
    key = engine.next_key(variant or inner.__name__)
    options = engine.current()
    if options.replay is not None and options.replay.check == key.check:
        _replay(ctx, key, options, inner, strategies, kw)
        return
    kw = {**kw, _EXAMPLES: tuple(examples)}
    search = _Search(inner, key)
    try:
        _hypothesis_test(ctx, key, options, search.guarded, strategies, kw, max_examples=max_examples,
                         scale_count=scale_count)()
    except _DeadlineReached:
        return
    except FlakyStrategyDefinition:
        # Stopping at the deadline ends a test case after its arguments were drawn but before the draws its body
        # makes (st.data()); Hypothesis then sees one prefix end two ways. An artefact of our stop, not a finding.
        if search.stopped_at_deadline:
            return
        raise
    except _Crashed as crash:
        raise _crash_report(ctx, key, options, search, crash, strategies, kw, max_examples=max_examples) from None
    except CheckFailure as err:
        raise with_example(err) from None
    except BaseExceptionGroup as group:  # several distinct failures, each shrunk
        merged = from_group(group)
        if merged is None:
            raise
        raise merged from None


# run_property passes its explicit examples to _hypothesis_test among the strategies, under a name no input can have.
_EXAMPLES = "(examples)"


def _hypothesis_test(ctx, key, options, func, strategies, kw, *, max_examples=None, scale_count: bool = True,
                     **changes) -> Callable[[], None]:
    kw = dict(kw)
    explicit = kw.pop(_EXAMPLES, ())
    base = settings_for(ctx.profile)
    if max_examples is None:
        count = base.max_examples
    else:
        count = scaled_count(max_examples, base.max_examples) if scale_count else min(max_examples, base.max_examples)
    # `seed` turns the database off in the settings it sees, so ours are applied over it. Shrinking stays on in
    # every profile: the report promises the smallest failing input, and on the catalogue's small drawn recipes it
    # costs seconds (benchmarks/time_to_verdict.py: every mutant's verdict under 5 s). The blob is printed for
    # --save-regressions, which replays it.
    # Hypothesis' explain phase (which parts of a failing example matter) took a failing check from 0.1-1.8 s to
    # 1.5-50 s (shape-loss and absolute-loss mutants, measured); it runs only in the fuzz profile, where time is cheap.
    phases = base.phases if canonical(ctx.profile) == "headguard-fuzz" else tuple(
        p for p in base.phases if p is not Phase.explain)
    chosen = settings(base, **{"max_examples": max(1, count), "database": _database(ctx, key, options),
                               "print_blob": True, "report_multiple_bugs": True, "phases": phases, **changes})
    test = given(*strategies, **kw)(func)
    for chosen_input in reversed(explicit):  # tried in the order given
        test = example(**chosen_input)(test)
    return chosen(seed(ctx.seed)(test))


def _database(ctx, key, options) -> ExampleDatabase | None:
    db = open_database(None, profile=ctx.profile) if options.database is engine.DEFAULT else options.database
    return None if db is None else KeyedDatabase(db, key)


class _Crashed(BaseException):
    """Carries the first crash out of Hypothesis (a BaseException, so it neither explores nor shrinks it)."""

    def __init__(self, error: BaseException, call: str):
        super().__init__(str(error))
        self.error = error
        self.call = call


class _DeadlineReached(BaseException):
    """The face's deadline passed before an example started (`headguard fuzz` ends the property there)."""


def is_crash(err: BaseException) -> bool:
    """An exception that says the subject or the check raised, rather than that a property is false."""
    if isinstance(err, CheckFailure):
        cause = err.__cause__
        return isinstance(cause, Exception) and not isinstance(cause, (CheckFailure, HypothesisException))
    return isinstance(err, Exception) and not isinstance(err, HypothesisException)


class _Search:
    """`inner` as the property Hypothesis searches: counts the examples, stops at the deadline unless something has
    failed (it is shrinking), and turns the first crash into `_Crashed`."""

    def __init__(self, inner: Callable, key: engine.PropertyKey):
        self.inner, self.key = inner, key
        self.failures_seen = 0
        self.stopped_at_deadline = False
        self.guarded = functools.wraps(inner)(lambda *args, **kwargs: self._run(*args, **kwargs))

    def _run(self, *args, **kwargs):
        if not self.failures_seen and engine.past_deadline():
            self.stopped_at_deadline = True
            raise _DeadlineReached
        engine.count_example(self.key)
        try:
            return self.inner(*args, **kwargs)
        except Exception as err:
            if is_crash(err):
                raise _Crashed(err, _call_text(self.inner, args, kwargs)) from err
            if isinstance(err, CheckFailure):
                self.failures_seen += 1
            raise


def _crash_report(ctx, key, options, search: _Search, crash: _Crashed, strategies, kw, *,
                  max_examples: int | None) -> BaseException:
    """The crash with Hypothesis' own account of the input: the same seeded search again, with no shrink phase and
    property failures let pass, stops at the same first crash. When the rerun does not crash (a subject that is not
    deterministic), the crash is reported with the repr of its arguments."""

    def crash_only(*args, **kwargs):
        try:
            return search.inner(*args, **kwargs)
        except CheckFailure as err:
            if is_crash(err):
                raise
            return None

    rerun = _hypothesis_test(ctx, key, options, functools.wraps(search.inner)(crash_only), strategies, kw,
                             max_examples=max_examples, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                             report_multiple_bugs=False)
    try:
        rerun()
    except Exception as err:  # noqa: BLE001  (the crash, now with Hypothesis' note of its input)
        found = with_example(err) if isinstance(err, CheckFailure) else err
    else:
        found = crash.error
        if isinstance(found, CheckFailure):
            found = CheckFailure(found.message, example=f"Falsifying example: {crash.call}", reproduce=found.reproduce)
        else:
            found.add_note(f"Falsifying example: {crash.call}")
    if search.failures_seen:
        found.add_note(f"before this crash the property also failed on {search.failures_seen} input(s), not shrunk: "
                       "fix the crash and run again to see them")
    return found


def _call_text(func: Callable, args, kwargs) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{func.__name__}({', '.join(parts)})"


def _replay(ctx, key, options, inner, strategies, kw) -> None:
    """Run the one input of `options.replay` (a `@reproduce_failure` blob); an input on which the property now holds
    passes (Hypothesis would call that DidNotReproduce)."""
    held = []

    def once(*args, **kwargs):
        inner(*args, **kwargs)
        held.append(True)

    test = _hypothesis_test(ctx, key, options, functools.wraps(inner)(once), strategies, kw)
    try:
        reproduce_failure(options.replay.version, options.replay.blob)(test)()
    except DidNotReproduce:
        if not held:
            raise
    except CheckFailure as err:
        raise with_example(err) from None


__all__ = ["execute", "is_crash", "run_property", "scaled_count", "single_threaded"]
