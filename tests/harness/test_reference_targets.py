"""The faces on the real reference heads and the real catalogue: the main job, `pytest --headguard heads:Polygon`,
and `parametrize_with_checks([heads.Detect])`. Skipped until headguard.reference (REFERENCE_SPECS) exists."""

from __future__ import annotations

import json

import pytest

reference = pytest.importorskip("headguard.reference")

import heads  # noqa: E402
from headguard.cli import main  # noqa: E402
from headguard.runner import known_checks  # noqa: E402
from headguard.targets import resolve_target  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("cls", [heads.Detect, heads.Polygon])
def test_reference_classes_use_their_reference_spec(cls):
    subject = resolve_target(f"heads:{cls.__name__}")
    assert dict(subject.expected_failures) == dict(reference.REFERENCE_LOSS_EXPECTED_FAILURES)
    assert ("polygons" in subject.capabilities) == (cls is heads.Polygon)


@pytest.mark.slow
def test_main_job_passes_on_the_reference_heads(capsys, tmp_path):
    """`headguard check` with no TARGET: both reference heads, every applicable check, exit 0."""
    path = tmp_path / "main.json"
    code = main(["check", "--profile", "ci", "--json", str(path)])
    out = capsys.readouterr().out
    records = json.loads(path.read_text())["results"]
    assert code == 0, out
    assert [r["target"] for r in records] == sorted((r["target"] for r in records), key=["heads:Detect",
                                                                                         "heads:Polygon"].index)
    assert {r["status"] for r in records} <= {"passed", "xfailed", "skipped"}
    polygon_checks = {r["name"] for r in records if r["target"] == "heads:Polygon"}
    assert polygon_checks == {name for name, chk in known_checks().items() if chk.kind == "head"}


def test_pytest_headguard_on_the_reference_polygon(pytester):
    pytester.chdir()
    collected = pytester.runpytest("--headguard", "heads:Polygon", "--collect-only", "-q")
    collected.stdout.fnmatch_lines(["heads:Polygon::check_loss_pure"], consecutive=False)
    ran = pytester.runpytest("--headguard", "heads:Polygon", "--headguard-profile", "ci",
                             "-k", "check_output_contract or check_loss_pure")
    head_checks = [c for c in known_checks().values() if c.kind == "head"]
    ran.assert_outcomes(passed=2, deselected=len(head_checks) - 2)


def test_parametrize_with_checks_on_the_reference_detect(pytester):
    pytester.makepyfile(test_ref="""
import headguard
import heads

@headguard.parametrize_with_checks([heads.Detect], select=["check_output_contract", "check_loss_pure"])
def test_detect(subject, check):
    check(subject)
""")
    result = pytester.runpytest("-v", "--hypothesis-profile", "ci")
    result.stdout.fnmatch_lines(["*test_detect[[]Detect-check_output_contract[]] PASSED*",
                                 "*test_detect[[]Detect-check_loss_pure[]] PASSED*"])
    result.assert_outcomes(passed=2)
