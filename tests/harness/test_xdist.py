"""`pytest -n 2 --headguard heads:Polygon` under pytest-xdist: every worker builds the same subject from the run's
seed, so the workers agree on the items and check identical weights (issue 10, item 5)."""

from __future__ import annotations

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is in the test extra: pip install -e '.[test]'")
pytest_plugins = ["pytester"]

SELECTION = "check_output_contract or check_class_prior or check_loss_pure or check_decode_consistency"


def test_two_workers_run_the_checks(pytester):
    result = pytester.runpytest_subprocess("-n", "2", "--headguard", "heads:Polygon", "--headguard-profile", "ci",
                                           "-k", SELECTION, "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*gw0*", "*gw1*"], consecutive=False)
    result.stdout.fnmatch_lines(["*heads:Polygon::check_loss_pure*"], consecutive=False)
