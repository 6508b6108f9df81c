"""The runner turns (subject, check) pairs into records with the documented statuses and fields."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headguard.registry import CATALOGUE, CheckFailure
from headguard.runner import (
    STATUSES, UnknownCheckError, run_check, run_checks, select_checks, using_catalogue,
)
from headguard.targets import subject_from

from . import _fakes, _tinyheads
from ._fakes import make_check


@pytest.fixture(scope="module")
def subject():
    return subject_from(_tinyheads.TINY, name="tinyheads:TINY")


def _caps(*capabilities):
    """A stand-in head subject with `capabilities` (select_checks reads only kind and capabilities)."""
    return types.SimpleNamespace(kind="head", capabilities=frozenset(capabilities))


def by_name(results):
    return {r.name: r for r in results}


def test_every_status_and_field(subject, fake_catalogue):
    results = by_name(run_checks(subject, select_checks(subject), profile="ci", seed=3))
    assert {n: r.status for n, r in results.items()} == {
        "check_passes": "passed", "check_fails": "failed", "check_hypothesis_fails": "failed",
        "check_errors": "error", "check_skips": "skipped", "check_records_seed": "passed",
    }
    failed = results["check_fails"]
    assert failed.message == "cv3.0.bias was never set by bias_init()"
    assert failed.example == "feats=[(1, 16, 8, 8)]"
    assert failed.reproduce == "headguard check tinyheads:TINY --select check_fails --seed 3 --profile ci"
    assert failed.doc == "A property that never holds."
    assert results["check_skips"].message == "needs a CUDA device"
    for r in results.values():
        assert r.status in STATUSES and r.target == "tinyheads:TINY"
        assert r.duration_s == pytest.approx(r.finished_at - r.started_at) and r.duration_s >= 0


def test_example_falls_back_to_the_hypothesis_note(subject):
    result = run_check(subject, make_check(_fakes.check_hypothesis_fails), profile="ci")
    assert result.status == "failed"
    # Shrunk to the smallest failing integer.
    assert result.message == "got n=6, expected n <= 5"
    assert result.example.startswith(("Falsifying example: inner(", "Failing test case: inner("))
    assert "n=6" in result.example and "reproduce_failure" not in result.example


def test_error_has_one_line_summary_and_the_last_frame(subject):
    result = run_check(subject, make_check(_fakes.check_errors))
    assert result.status == "error"
    assert result.message == "KeyError: 'missing key'"
    assert result.where.startswith(_fakes.__file__) and "in check_errors" in result.where
    assert isinstance(result.exception, KeyError)


def test_exception_group_of_check_failures_is_a_failure(subject):
    def check_two_bugs(subject, ctx):
        """Two distinct failures at once."""
        raise ExceptionGroup("two", [CheckFailure("first bug"), CheckFailure("second bug", example="x=1")])

    result = run_check(subject, make_check(check_two_bugs))
    assert result.status == "failed"
    assert "[1] first bug" in result.message and "[2] second bug" in result.message
    assert result.example == "[2] x=1"


@pytest.mark.parametrize(("check", "status", "text"), [
    (_fakes.check_fails, "xfailed", "expected failure: known bug 17"),
    (_fakes.check_passes, "failed", "expected to fail because known bug 17, but passed: remove it from "
                                    "expected_failures"),
    (_fakes.check_errors, "error", "but raised an error instead of failing"),
    (_fakes.check_skips, "skipped", "needs a CUDA device"),
])
def test_expected_failures_are_strict(subject, check, status, text):
    import dataclasses

    marked = dataclasses.replace(subject, expected_failures={check.__name__: "known bug 17"})
    result = run_check(marked, make_check(check))
    assert result.status == status
    assert text in result.message


@settings(max_examples=5)
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_torch_is_seeded_before_each_check(subject, seed):
    _fakes.SEEN_RANDOM.clear()
    torch.rand(7)  # whatever state the caller left must not matter
    check = make_check(_fakes.check_records_seed)
    run_checks(subject, [check, make_check(_fakes.check_passes), check], seed=seed)
    torch.manual_seed(seed)
    expected = float(torch.rand(()))
    assert _fakes.SEEN_RANDOM == [expected, expected]


def test_callbacks_and_times_are_in_order(subject):
    events = []
    checks = [make_check(f) for f in (_fakes.check_passes, _fakes.check_fails, _fakes.check_skips)]
    results = run_checks(subject, checks, on_start=lambda s, c: events.append(("start", c.name)),
                         on_finish=lambda r: events.append(("finish", r.name)))
    assert events == [(kind, c.name) for c in checks for kind in ("start", "finish")]
    times = [t for r in results for t in (r.started_at, r.finished_at)]
    assert times == sorted(times)


def test_exitfirst_stops_after_the_first_failure(subject):
    checks = [make_check(f) for f in (_fakes.check_passes, _fakes.check_fails, _fakes.check_skips)]
    assert [r.name for r in run_checks(subject, checks, exitfirst=True)] == ["check_passes", "check_fails"]


def test_callers_hypothesis_profile_is_restored(subject):
    before = settings.get_current_profile_name()
    seen = []
    probe = make_check(lambda s, ctx: seen.append(settings.get_current_profile_name()))
    run_checks(subject, [probe], profile="fuzz" if before != "fuzz" else "dev")
    assert seen == ["fuzz" if before != "fuzz" else "dev"]
    assert settings.get_current_profile_name() == before


def test_select_checks_gates_on_capabilities_and_names(fake_catalogue):
    def names(checks):
        return [c.name for c in checks]

    everything = names(_fakes.CATALOGUE)
    assert names(select_checks(_caps("polygons"))) == everything
    assert "check_polygons_only" not in names(select_checks(_caps()))
    assert names(select_checks(_caps(), select=["check_fails", "check_skips"])) == ["check_fails", "check_skips"]
    assert "check_fails" not in names(select_checks(_caps("polygons"), deselect=["check_fails"]))
    with pytest.raises(UnknownCheckError, match="unknown check name 'check_fail' .*did you mean 'check_fails'"):
        select_checks(_caps(), select=["check_fail"])


def test_using_catalogue_leaves_the_global_catalogue_alone():
    before = dict(CATALOGUE)
    with using_catalogue(_fakes.CATALOGUE):
        assert [c.name for c in select_checks(_caps("polygons"))] == [c.name for c in _fakes.CATALOGUE]
    assert CATALOGUE == before


@pytest.mark.parametrize(("given", "expected"), [
    (None, ["headguard check tinyheads:TINY --select check_custom --seed 0 --profile dev"]),
    ("You can reproduce this test case by adding @reproduce_failure('6', b'AA')",
     ["headguard check tinyheads:TINY --select check_custom --seed 0 --profile dev",
      "You can reproduce this test case by adding @reproduce_failure('6', b'AA')"]),
    ("headguard check tinyheads:TINY --select check_custom --seed 0 --profile fuzz",
     ["headguard check tinyheads:TINY --select check_custom --seed 0 --profile fuzz"]),
])
def test_reproduce_command_comes_first(subject, given, expected):
    def check_custom(subject, ctx):
        """Fails with the given reproduce hint."""
        raise CheckFailure("broken", reproduce=given)

    assert run_check(subject, make_check(check_custom)).reproduce.splitlines() == expected


def test_stop_when_stops_after_the_accepted_result(subject):
    checks = [make_check(f) for f in (_fakes.check_fails, _fakes.check_skips, _fakes.check_passes)]
    results = run_checks(subject, checks, stop_when=lambda r: r.status == "skipped")
    assert [r.name for r in results] == ["check_fails", "check_skips"]
