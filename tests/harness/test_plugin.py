"""The pytest face: `pytest --headguard TARGET` and `parametrize_with_checks`, run in throw-away projects."""

from __future__ import annotations

import pytest

from headguard.runner import using_catalogue

from . import _fakes

pytest_plugins = ["pytester"]


@pytest.fixture
def project(pytester: pytest.Pytester):
    """A throw-away project with the fake target module, run in-process under the fake catalogue."""
    pytester.makepyfile(tinyheads=_fakes.TARGET_MODULE)
    pytester.syspathinsert()
    with using_catalogue(_fakes.CATALOGUE):
        yield pytester


def test_headguard_option_collects_one_item_per_check(project):
    result = project.runpytest("--headguard", "tinyheads:TINY", "--collect-only", "-q")
    names = [c.name for c in _fakes.CATALOGUE if not c.requires]
    result.stdout.fnmatch_lines([f"tinyheads:TINY::{n}" for n in names])
    assert result.ret == 0


def test_headguard_run_reports_like_the_cli(project):
    result = project.runpytest("--headguard", "tinyheads:TINY", "--headguard-profile", "ci",
                               "--headguard-seed", "9", "-rA")
    result.assert_outcomes(passed=2, failed=3, skipped=1)
    result.stdout.fnmatch_lines([
        "*headguard: targets tinyheads:TINY; profile ci, seed 9*",
        "collected 6 items",
        "*_ tinyheads:TINY::check_fails _*",
        "cv3.0.bias was never set by bias_init()",
        "  property: A property that never holds.",
        "  example:  feats=[(1, 16, 8, 8)]",
        "  reproduce: headguard check tinyheads:TINY --select check_fails --seed 9 --profile ci",
    ])
    # A crashing check keeps its own traceback, from the check's frame down to the failing line.
    result.stdout.fnmatch_lines([
        "*_ tinyheads:TINY::check_errors _*",
        "KeyError: 'missing key'",
        "  property: A check that crashes.",
        "  where:    *_fakes.py:* in check_errors: return {}[[]\"missing key\"[]]",
        "*",
        "",
        "Traceback (most recent call last):",
        "  File *_fakes.py*, line *, in check_errors",
    ])
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] tinyheads:TINY::check_skips: needs a CUDA device",
                                 "FAILED tinyheads:TINY::check_fails - cv3.0.bias was never set by bias_init()"])


def test_several_targets_and_keyword_selection(project):
    result = project.runpytest("--headguard", "tinyheads:TINY", "--headguard", "tinyheads:TINY_POLY",
                               "-k", "polygons_only or records_seed", "-v")
    result.stdout.fnmatch_lines(["tinyheads:TINY::check_records_seed PASSED*",
                                 "tinyheads:TINY_POLY::check_polygons_only PASSED*",
                                 "tinyheads:TINY_POLY::check_records_seed PASSED*"])
    result.assert_outcomes(passed=3, deselected=10)


def test_expected_failures_xfail_strictly(project):
    result = project.runpytest("--headguard", "tinyheads:TINY_XFAIL", "-k", "check_fails", "-rx")
    result.assert_outcomes(xfailed=1, deselected=5)
    result.stdout.fnmatch_lines(["XFAIL tinyheads:TINY_XFAIL::check_fails - bug 17"])
    stale = project.runpytest("--headguard", "tinyheads:TINY_STALE", "-k", "check_passes")
    stale.assert_outcomes(failed=1, deselected=5)
    stale.stdout.fnmatch_lines(["*expected to fail because it was broken once, but passed*"])


def test_suite_files_are_left_alone_unless_named(project):
    project.makepyfile(test_other="def test_other():\n    pass\n")
    alone = project.runpytest("--headguard", "tinyheads:TINY", "-k", "check_passes")
    alone.assert_outcomes(passed=1, deselected=5)
    both = project.runpytest("--headguard", "tinyheads:TINY", "-k", "passes or other", "test_other.py")
    both.assert_outcomes(passed=2, deselected=5)


def test_bad_target_is_a_usage_error(project):
    result = project.runpytest("--headguard", "tinyheads:NeedsDepth")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --headguard: tinyheads:NeedsDepth(nc=2, ch=(16, 32, 64)) raised TypeError:*"
                                 "; a head must accept nc and ch, or use HeadSpec(head_kwargs=...)"])
    assert "Traceback" not in result.stderr.str()


def test_profile_choices_are_shared_with_the_cli(project):
    result = project.runpytest("--headguard", "tinyheads:TINY", "--headguard-profile", "slow")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--headguard-profile: invalid choice: 'slow' (choose from*dev*ci*fuzz*"])


def test_without_the_option_nothing_is_added(project):
    project.makepyfile(test_other="def test_other():\n    pass\n")
    project.runpytest().assert_outcomes(passed=1)


PARAMETRIZED = """
import headguard
import tinyheads

@headguard.parametrize_with_checks([tinyheads.TINY_XFAIL, tinyheads.TINY_POLY], deselect=["check_errors"])
def test_head(subject, check):
    check(subject)
"""


def test_parametrize_with_checks(project):
    project.makepyfile(test_heads=PARAMETRIZED)
    result = project.runpytest("-v", "--hypothesis-profile", "ci")
    result.stdout.fnmatch_lines([
        "test_heads.py::test_head[[]TINY_XFAIL-check_passes[]] PASSED*",
        "test_heads.py::test_head[[]TINY_XFAIL-check_fails[]] XFAIL*",
        "test_heads.py::test_head[[]TINY_POLY-check_polygons_only[]] PASSED*",
    ], consecutive=False)
    # The reproduce line names the spec the test used (its loss, its head_kwargs), not the bare head class.
    result.stdout.fnmatch_lines(["*inner(*", "*n=6,*", "*reproduce: headguard check tinyheads:TINY_POLY"
                                 " --select check_hypothesis_fails --seed 0 --profile ci*"], consecutive=False)
    result.assert_outcomes(passed=5, failed=3, skipped=2, xfailed=1)
