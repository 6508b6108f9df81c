"""The pytest plugin (entry point `pytest11`): markers, Hypothesis profiles, `pytest --headguard TARGET`, and
`parametrize_with_checks` for test modules.

`pytest --headguard heads:Polygon` collects one item per applicable check (`heads:Polygon::check_loss_pure`). Without
file or directory arguments it runs only those items, not the test suite found from `testpaths`.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import settings

import headguard.profiles  # (registers dev, ci and fuzz before Hypothesis reads --hypothesis-profile)
from headguard.cli import add_run_options
from headguard.registry import Check, CheckContext, CheckFailure, CheckSkipped
from headguard.report import format_failure
from headguard.runner import (
    CheckResult, UnknownCheckError, as_check_failure, reproduce_command, run_check, seed_everything, select_checks,
    validate_names,
)
from headguard.subject import Subject
from headguard.targets import TargetError, resolve_target, short_name, subject_from


@dataclasses.dataclass(frozen=True)
class _Options:
    targets: tuple[str, ...]
    profile: str
    seed: int


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
    config.stash[_OPTIONS] = _Options(
        targets=tuple(config.getoption("headguard")),
        profile=config.getoption("headguard_profile"),
        seed=config.getoption("headguard_seed"),
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
            subject = resolve_target(target)
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
        super().__init__(result.message)
        self.result = result


class HeadguardItem(pytest.Item):
    """One check on one target, run through the same runner as `headguard check`."""

    def __init__(self, *, check: Check, **kwargs: Any):
        super().__init__(**kwargs)
        self.check = check
        self.result: CheckResult | None = None

    def runtest(self) -> None:
        opts = self.config.stash[_OPTIONS]
        self.result = result = run_check(self.parent.subject, self.check, profile=opts.profile, seed=opts.seed)
        self.user_properties.append(("reproduce", result.reproduce or ""))
        if result.status == "skipped":
            pytest.skip(result.message)
        if result.status == "xfailed":
            pytest.xfail(self.parent.subject.expected_failures[self.check.name])
        if result.status != "passed":
            raise CheckFailed(result)

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
    """A check as the `check` argument of a parametrized test: `check(subject)` seeds torch and runs it; on failure
    the example and the reproduce command are attached to the exception as notes."""

    check: Check
    seed: int = 0

    @property
    def name(self) -> str:
        return self.check.name

    def __call__(self, subject: Subject) -> None:
        __tracebackhide__ = True
        profile = settings.get_current_profile_name()
        ctx = CheckContext(profile=profile if profile in headguard.profiles.PROFILES else "dev", seed=self.seed)
        seed_everything(self.seed)
        try:
            self.check.func(subject, ctx)
        except CheckSkipped as exc:
            pytest.skip(str(exc))
        except Exception as exc:
            failure = as_check_failure(exc)
            if not isinstance(failure, CheckFailure):
                raise
            _attach_notes(failure, subject, self, ctx)
            if failure is exc:
                raise
            raise failure from None

    def __repr__(self) -> str:
        return self.check.name


def _check_traceback(exc: BaseException) -> str:
    """The traceback of a crashed check from the check's own frame down (the runner's frame is left out)."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


def _attach_notes(failure: CheckFailure, subject: Subject, bound: BoundCheck, ctx: CheckContext) -> None:
    # Hypothesis' own "Falsifying example" note is already among the notes pytest shows; add only what is not.
    if failure.example:
        failure.add_note(f"example: {failure.example}")
    failure.add_note("reproduce: " + (failure.reproduce or reproduce_command(
        subject.name, bound.name, seed=bound.seed, profile=ctx.profile)))


def parametrize_with_checks(
    heads: Iterable[Any], *, select: Sequence[str] = (), deselect: Sequence[str] = (), seed: int = 0
):
    """Parametrize a test with `(subject, check)` for every applicable check of every head, scikit-learn style::

        @parametrize_with_checks([heads.Detect, HeadSpec(head=MyHead, loss=my_loss)])
        def test_head(subject, check):
            check(subject)

    A head is a head class, a `headguard.HeadSpec` or a Subject. Ids read `Detect-check_loss_pure`; a subject's
    expected failures become `xfail(strict=True)` with their reason.
    """
    params = []
    for obj in heads:
        subject = subject_from(obj)
        for chk in select_checks(subject, select=select, deselect=deselect):
            reason = subject.expected_failures.get(chk.name)
            marks = [pytest.mark.xfail(strict=True, reason=reason, raises=CheckFailure)] if reason else []
            params.append(pytest.param(subject, BoundCheck(chk, seed), marks=marks,
                                       id=f"{short_name(subject)}-{chk.name}"))
    return pytest.mark.parametrize(("subject", "check"), params)
