"""`--save-regressions` writes pytest files that fail on the bug and pass once it is fixed, and `headguard fuzz`
ends cleanly within its budget with a summary (issue 10, item 5)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

from headguard.cli import main

TESTS = pathlib.Path(__file__).resolve().parents[1]  # where `mutants` is importable from


def run_pytest(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "--rootdir", str(path.parent)], cwd=TESTS, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("mutant", "check", "draws"), [
    ("R1_SPEC", "check_class_prior", False),  # a seeded input: the file runs the check again
    ("R8_SPEC", "check_loss_rejects_nonfinite", True),  # a drawn input: the file replays its blob
])
def test_a_saved_regression_fails_on_the_bug_and_passes_once_fixed(tmp_path, monkeypatch, capsys, mutant, check,
                                                                    draws):
    monkeypatch.chdir(TESTS)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "regressions"
    code = main(["check", f"mutants:{mutant}", "--select", check, "--profile", "ci", "--save-regressions", str(out)])
    assert code == 1
    files = sorted(out.glob("test_*.py"))
    assert files, capsys.readouterr().err
    source = files[0].read_text()
    assert f"replay('mutants:{mutant}', '{check}'" in source
    assert ("example=('" in source) == draws
    failing = run_pytest(files[0])
    assert failing.returncode == 1, failing.stdout
    fixed = files[0].with_name(f"test_fixed_{files[0].stem[5:]}.py")
    fixed.write_text(source.replace(f"'mutants:{mutant}'", "'mutants:REFERENCE'"))
    passing = run_pytest(fixed)
    assert passing.returncode == 0, passing.stdout


def test_fuzz_ends_within_its_budget_with_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code = main(["fuzz", "heads:Polygon", "--seconds", "4", "--select", "check_loss_rejects_nonfinite",
                 "check_loss_target_order_invariant"])
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert elapsed < 4 + 15  # building the subject, and the example in flight at the deadline
    assert "check_loss_target_order_invariant" in captured.out and "0 failure(s)" in captured.out
    tried = int(captured.out.split(" run(s), ")[1].split(" examples")[0])
    assert tried > 0
    assert "round 0 seed 0 heads:Polygon::check_output_contract" in captured.err  # progress, per run


def test_fuzz_reports_a_failure_exits_1_and_saves_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(TESTS)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = main(["fuzz", "mutants:R8_SPEC", "--seconds", "3", "--select", "check_loss_rejects_nonfinite",
                 "--database", str(tmp_path / "db"), "--save-regressions", str(tmp_path / "regressions")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED mutants:R8_SPEC::check_loss_rejects_nonfinite" in out and "1 failure(s)" in out
    assert list((tmp_path / "regressions").glob("test_*.py"))
    assert any((tmp_path / "db").iterdir())  # the failure is kept for the next run
