"""The pytest plugin (entry point `pytest11`): markers, Hypothesis profiles, `pytest --headguard TARGET`, and
`parametrize_with_checks` for test modules.

`pytest --headguard heads:Polygon` collects one item per applicable check (`heads:Polygon::check_loss_pure`). Without
file or directory arguments it runs only those items, not the test suite found from `testpaths`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shlex
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import settings

import headguard.profiles  # (registers headguard-dev/-ci/-fuzz before Hypothesis reads --hypothesis-profile)
from headguard import engine
from headguard.cli import add_run_options
from headguard.database import DatabaseError, open_database
from headguard.registry import Check
from headguard.report import format_failure
from headguard.runner import CheckResult, UnknownCheckError, reproduce_command, run_check, select_checks, validate_names
from headguard.subject import Subject
from headguard.targets import TargetError, default_name, resolve_target, short_name, subject_from


@dataclasses.dataclass(frozen=True)
class _Options:
    targets: tuple[str, ...]
    profile: str
    seed: int
    timeout: float | None
    database: Any


_OPTIONS = pytest.StashKey[_Options]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("headguard", "headguard: property checks for detector heads")
    group.addoption("--headguard", action="append", default=[], metavar="TARGET",
                    help="run the check catalogue on TARGET (module:attr, a head class or a headguard.HeadSpec); "
                         "repeatable")
    add_run_options(group.addoption, prefix="headguard-")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped (not passed) without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")
    profile = config.getoption("headguard_profile")
    targets = tuple(config.getoption("headguard"))
    try:  # opened only for a --headguard run: a Redis URL is reached once per process (each xdist worker)
        database = (open_database(config.getoption("headguard_database"), profile=profile,
                                  option="--headguard-database") if targets else None)
    except DatabaseError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_OPTIONS] = _Options(
        targets=targets,
        profile=profile,
        seed=config.getoption("headguard_seed"),
        timeout=config.getoption("headguard_timeout"),
        database=database,
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    opts = config.stash[_OPTIONS]
    if not opts.targets:
        return None
    return f"headguard: targets {', '.join(opts.targets)}; profile {opts.profile}, seed {opts.seed}"


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """With --headguard and no explicit paths, collect only the checks (not the suite under testpaths)."""
    if config.stash[_OPTIONS].targets and config.args_source != pytest.Config.ArgsSource.ARGS:
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, which must see our items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    opts = config.stash[_OPTIONS]
    for target in opts.targets:
        try:
            # Built from the run's seed: every xdist worker collects an identical subject.
            subject = resolve_target(target, seed=opts.seed, timeout=opts.timeout)
            validate_names(subject.expected_failures, where=f"the expected_failures of {target}")
        except (TargetError, UnknownCheckError) as exc:
            raise pytest.UsageError(f"--headguard: {exc}") from None
        collector = HeadguardTarget.from_parent(session, name=target, nodeid=target, subject=subject)
        items.extend(session.genitems(collector))  # reports the collection, as for files


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (marked cuda); none is available here")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Report a skipped check at its node id ("SKIPPED [1] heads:Polygon::check_x: reason"), not at the line of
    this plugin that called pytest.skip()."""
    report = yield
    if isinstance(item, HeadguardItem) and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(item.config.rootpath / item.nodeid), None, report.longrepr[2])
    return report


class HeadguardTarget(pytest.Collector):
    """One --headguard TARGET: its applicable checks as items."""

    def __init__(self, *, subject: Subject, **kwargs: Any):
        super().__init__(**kwargs)
        self.subject = subject

    def collect(self) -> list[pytest.Item]:
        checks = select_checks(self.subject)
        return [HeadguardItem.from_parent(self, name=c.name, nodeid=f"{self.nodeid}::{c.name}", check=c)
                for c in checks]


class CheckFailed(Exception):
    """Raised by a HeadguardItem whose check failed; carries the record that repr_failure formats."""

    def __init__(self, result: CheckResult):
        super().__init__(format_failure(result, title=False))
        self.result = result


def _raise_outcome(result: CheckResult, subject: Subject) -> None:
    """Turn a record into pytest's outcome: skip, xfail, or CheckFailed carrying the record."""
    __tracebackhide__ = True
    if result.status == "skipped":
        pytest.skip(result.message)
    if result.status == "xfailed":
        pytest.xfail(subject.expected_failures[result.name].reason)
    if result.status != "passed":
        raise CheckFailed(result)


class HeadguardItem(pytest.Item):
    """One check on one target, run through the same runner as `headguard check`."""

    def __init__(self, *, check: Check, **kwargs: Any):
        super().__init__(**kwargs)
        self.check = check
        self.result: CheckResult | None = None

    def runtest(self) -> None:
        opts = self.config.stash[_OPTIONS]
        with engine.options(database=opts.database):
            self.result = result = run_check(self.parent.subject, self.check, profile=opts.profile, seed=opts.seed,
                                             timeout=opts.timeout)
        self.user_properties.append(("reproduce", result.reproduce or ""))
        _raise_outcome(result, self.parent.subject)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):
        if isinstance(excinfo.value, CheckFailed):
            result = excinfo.value.result
            text = format_failure(result, title=False)
            if result.status == "error" and result.exception is not None:
                text += "\n\n" + _check_traceback(result.exception)
            return text
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, self.nodeid


# --- parametrize_with_checks -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BoundCheck:
    """A check as the `check` argument of a parametrized test: `check(subject)` runs it through the same runner as
    `headguard check` (seeded, isolated, time-limited, expected failures by cause) and turns the record into pytest's
    outcome. `target` is the `module:NAME` that `headguard check` can load for the same subject, when there is one;
    otherwise the reproduce line is the test's own node id."""

    check: Check
    seed: int = 0
    target: str | None = None

    @property
    def name(self) -> str:
        return self.check.name

    def __call__(self, subject: Subject) -> None:
        __tracebackhide__ = True
        current = settings.get_current_profile_name()
        # A short name means ours here even where it is registered as another profile (Hypothesis' own `ci`).
        profile = current if current in headguard.profiles.CHOICES else "headguard-dev"
        result = run_check(subject, self.check, profile=profile, seed=self.seed)
        result.reproduce = self.reproduce(profile)
        _raise_outcome(result, subject)

    def reproduce(self, profile: str) -> str:
        if self.target is not None:
            return reproduce_command(self.target, self.name, seed=self.seed, profile=profile)
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rpartition(" (")[0]
        return f"python -m pytest {shlex.quote(test)} --hypothesis-profile={profile}" if test else ""

    def __repr__(self) -> str:
        return self.check.name


def _check_traceback(exc: BaseException) -> str:
    """The traceback of a crashed check from the check's own frame down (the runner's frame is left out)."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


def parametrize_with_checks(
    heads: Iterable[Any], *, select: Sequence[str] = (), deselect: Sequence[str] = (), seed: int = 0
):
    """Parametrize a test with `(subject, check)` for every applicable check of every head, scikit-learn style::

        @parametrize_with_checks([heads.Detect, SPEC])
        def test_head(subject, check):
            check(subject)

    A head is a head class, a `headguard.HeadSpec` or a Subject, built from `seed`. Ids read `Detect-check_loss_pure`
    (a spec bound to a module-level name reads `SPEC-check_loss_pure`; ids are unique); a failure's reproduce line is
    `headguard check module:NAME ...` when the head or spec has an importable name, else the test's node id.
    """
    caller = inspect.currentframe().f_back.f_globals
    params, seen = [], {}
    for obj in heads:
        target = _importable_name(obj, caller)
        subject = subject_from(obj, name=target, seed=seed)
        label = target.rpartition(":")[2] if target else short_name(subject)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}{seen[label]}"
        for chk in select_checks(subject, select=select, deselect=deselect):
            params.append(pytest.param(subject, BoundCheck(chk, seed, target), id=f"{label}-{chk.name}"))
    return pytest.mark.parametrize(("subject", "check"), params)


def _importable_name(obj: Any, namespace: dict[str, Any]) -> str | None:
    """`module:NAME` for an object bound to a public name in the calling module or in a module it imported
    (`specs.SPEC`), else `module:qualname` for a class; None for an unnamed spec (HeadSpec(...) written inline),
    whose setup no TARGET string reproduces."""
    modules = [(namespace.get("__name__"), namespace)]
    modules += [(m.__name__, vars(m)) for m in namespace.values() if isinstance(m, types.ModuleType)]
    for module, names in modules:
        for key, value in names.items():
            if value is obj and not key.startswith("_") and module:
                return f"{module}:{key}"
    if isinstance(obj, Subject):
        return obj.name
    if isinstance(obj, type):
        return default_name(obj)
    return None
