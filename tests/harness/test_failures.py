"""Every distinct failure of a property is reported with its own shrunk example, and a crash ends the search at once
(issue 10, item 4)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from hypothesis import strategies as st

from headguard import engine, report
from headguard.testing import call, run_property
from headguard.registry import CheckFailure
from headguard.runner import run_check
from headguard.targets import subject_from

from . import _tinyheads
from ._fakes import make_check


@pytest.fixture(scope="module")
def subject():
    return subject_from(_tinyheads.TINY, name="tinyheads:TINY")


@pytest.fixture(autouse=True)
def _no_database():
    """Each run starts from nothing: no examples replayed from an earlier run, none left in the checkout."""
    with engine.options(database=None):
        yield


def check_two_bugs(subject, ctx):
    """Integers lie in [-5, 5] (they don't, on either side)."""

    def inner(n):
        if n > 5:
            raise CheckFailure(f"got n={n}, expected n <= 5")
        if n < -5:
            raise CheckFailure(f"got n={n}, expected n >= -5")

    run_property(ctx, inner, st.integers(-1000, 1000))


def test_each_distinct_failure_comes_with_its_own_shrunk_example(subject, tmp_path):
    result = run_check(subject, make_check(check_two_bugs), profile="headguard-dev", seed=1)
    assert result.status == "failed"
    found = sorted((f.message, f.example) for f in result.failures)
    assert [message for message, _ in found] == ["got n=-6, expected n >= -5", "got n=6, expected n <= 5"]
    assert "n=-6" in found[0][1] and "n=6" in found[1][1]
    assert all(f.replay and f.replay.startswith("@reproduce_failure(") for f in result.failures)
    # The reports show every one: text, JSON and JUnit.
    text = report.format_failure(result)
    assert "failure 1 of 2" in text and "failure 2 of 2" in text and "n=-6" in text and "n=6" in text
    report.write_json(tmp_path / "r.json", [result], profile="headguard-dev", seed=1)
    records = json.loads((tmp_path / "r.json").read_text())["results"][0]["failures"]
    assert sorted(r["message"] for r in records) == [message for message, _ in found]
    report.write_junit(tmp_path / "r.xml", [result], profile="headguard-dev", seed=1)
    junit = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase/failure")
    assert "n=-6" in junit.text and "n=6" in junit.text


CRASHES: list[int] = []


def _loss_that_raises(n: int) -> float:
    if n > 10:
        CRASHES.append(n)
        raise RuntimeError("index 11 is out of bounds")
    return float(n)


def check_subject_raises(subject, ctx):
    """The loss never raises on valid input (it does, above 10)."""

    def inner(n):
        call("the loss", _loss_that_raises, n)

    run_property(ctx, inner, st.integers(0, 10**6))


def check_check_raises(subject, ctx):
    """A check whose own code raises above 10."""

    def inner(n):
        if n > 10:
            CRASHES.append(n)
            raise KeyError("missing")

    run_property(ctx, inner, st.integers(0, 10**6))


@pytest.mark.parametrize(("check", "status", "text"), [
    (check_subject_raises, "failed", "the loss raised RuntimeError on valid input"),
    (check_check_raises, "error", "KeyError"),
])
def test_a_crash_ends_the_search_unshrunk(subject, check, status, text):
    """Hypothesis would explore and shrink the crash (dozens of calls, to n=11); the search stops at the first one,
    and one rerun without shrinking gives Hypothesis' note of that input."""
    CRASHES.clear()
    result = run_check(subject, make_check(check), profile="headguard-dev", seed=2)
    assert result.status == status and text in result.message
    # The search's crash, then the rerun's (found, and replayed once for the report): one input, never shrunk.
    assert len(set(CRASHES)) == 1 and len(CRASHES) <= 3
    assert result.example and f"n={CRASHES[0]}" in result.example
