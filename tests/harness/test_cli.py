"""`headguard check`: exit codes, one-line usage errors, --select/--deselect, --json and --junit."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import xml.etree.ElementTree as ET

import pytest

from headguard.cli import main
from headguard.progress import Progress
from headguard.registry import CATALOGUE, load_catalogue
from headguard.runner import CheckResult, using_catalogue

from . import _fakes

pytestmark = pytest.mark.usefixtures("fake_catalogue", "target_dir")


NOT_A_SUBJECT = ("not a subject: expected a head (an nn.Module subclass or a headguard.HeadSpec) or a shape loss "
                 "(fn(pred, target, ...) or a headguard.ShapeLossSpec)")


def run(capsys, *argv):
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


def test_all_passed_exits_0(capsys):
    code, out, err = run(capsys, "tinyheads:TINY", "--select", "check_passes", "check_records_seed")
    # Off a terminal, progress is one plain line per target on stderr, so a slow CI run is never silent.
    assert code == 0 and err == "headguard: checking tinyheads:TINY (2 checks)\n"
    assert "  passed   check_passes" in out and "  passed   check_records_seed" in out
    assert out.splitlines()[-1].startswith("2 passed in ")


def test_a_failure_exits_1_and_reports_it(capsys):
    code, out, _ = run(capsys, "tinyheads:TINY", "--select", "check_passes,check_fails", "--seed", "4",
                       "--profile", "ci")
    assert code == 1
    assert "FAILED tinyheads:TINY::check_fails" in out
    assert "  property: A property that never holds." in out
    assert "  message:  cv3.0.bias was never set by bias_init()" in out
    assert "  example:  feats=[(1, 16, 8, 8)]" in out
    assert "  reproduce: headguard check tinyheads:TINY --select check_fails --seed 4 --profile ci" in out


def test_an_error_exits_1(capsys):
    code, out, _ = run(capsys, "tinyheads:TINY", "--select", "check_errors")
    assert code == 1 and "ERROR tinyheads:TINY::check_errors" in out and "KeyError: 'missing key'" in out


def test_the_reproduce_command_reproduces_the_failure(capsys, tmp_path):
    first = tmp_path / "first.json"
    assert run(capsys, "tinyheads:TINY", "--profile", "ci", "--json", str(first))[0] == 1
    failed = [r for r in json.loads(first.read_text())["results"] if r["status"] == "failed"]
    assert {r["name"] for r in failed} == {"check_fails", "check_hypothesis_fails"}
    for record in failed:
        again = tmp_path / "again.json"
        argv = shlex.split(record["reproduce"])
        assert argv[:2] == ["headguard", "check"]
        assert run(capsys, *argv[2:], "--json", str(again))[0] == 1
        (rerun,) = json.loads(again.read_text())["results"]
        assert {k: rerun[k] for k in ("name", "status", "message", "example")} == \
               {k: record[k] for k in ("name", "status", "message", "example")}


def test_expected_failures_pass_and_stale_ones_fail(capsys):
    code, out, _ = run(capsys, "tinyheads:TINY_XFAIL", "--select", "check_fails", "check_passes")
    assert code == 0 and "  xfailed  check_fails" in out and "expected failure: bug 17" in out
    code, out, _ = run(capsys, "tinyheads:TINY_STALE", "--select", "check_passes")
    assert code == 1
    assert "expected to fail because it was broken once, but passed: remove it from expected_failures" in out


def test_select_and_deselect(capsys, tmp_path):
    path = tmp_path / "r.json"
    run(capsys, "tinyheads:TINY", "tinyheads:TINY_POLY", "--deselect", "check_fails", "check_errors",
        "--json", str(path))
    ran = [(r["target"], r["name"]) for r in json.loads(path.read_text())["results"]]
    everything = [c.name for c in _fakes.CATALOGUE if c.name not in ("check_fails", "check_errors")]
    assert ran == [("tinyheads:TINY", n) for n in everything if n != "check_polygons_only"] + \
        [("tinyheads:TINY_POLY", n) for n in everything]


def test_selecting_a_check_that_does_not_apply_says_so(capsys, tmp_path):
    path = tmp_path / "r.json"
    # Nothing was checked: not a pass (exit 5, as pytest's "no tests ran").
    assert run(capsys, "tinyheads:TINY", "--select", "check_polygons_only", "--json", str(path))[0] == 5
    (record,) = json.loads(path.read_text())["results"]
    assert record["status"] == "skipped" and "needs capability polygons" in record["message"]


def test_json_and_junit_files(capsys, tmp_path):
    jpath, xpath = tmp_path / "r.json", tmp_path / "reports" / "new" / "r.xml"
    code, _, _ = run(capsys, "tinyheads:TINY", "tinyheads:TINY_XFAIL", "--json", str(jpath), "--junit", str(xpath))
    assert code == 1
    records = json.loads(jpath.read_text())["results"]
    statuses = {(r["target"], r["name"]): r["status"] for r in records}
    assert statuses[("tinyheads:TINY", "check_fails")] == "failed"
    assert statuses[("tinyheads:TINY_XFAIL", "check_fails")] == "xfailed"
    assert statuses[("tinyheads:TINY", "check_skips")] == "skipped"
    assert statuses[("tinyheads:TINY", "check_errors")] == "error"
    suites = ET.parse(xpath).getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["tinyheads:TINY", "tinyheads:TINY_XFAIL"]
    tiny, xfail = suites
    assert (tiny.get("tests"), tiny.get("failures"), tiny.get("errors"), tiny.get("skipped")) == ("6", "2", "1", "1")
    assert (xfail.get("failures"), xfail.get("skipped")) == ("1", "2")


USAGE_ERRORS = [
    (["brokenmod:X"], "headguard: error: cannot import module 'brokenmod' (TARGET brokenmod:X): "
                      "RuntimeError: boom while importing"),
    (["not_a_module_xyz:Head"], "headguard: error: cannot import module 'not_a_module_xyz' (TARGET "
                                "not_a_module_xyz:Head): ModuleNotFoundError: No module named 'not_a_module_xyz'"),
    (["tinyheads:Missing"], "headguard: error: module 'tinyheads' has no attribute 'Missing' "
                            "(TARGET tinyheads:Missing)"),
    (["tinyheads:NOT_A_HEAD"], f"headguard: error: tinyheads:NOT_A_HEAD is an int, {NOT_A_SUBJECT}"),
    (["tinyheads:A_MODULE_INSTANCE"], "headguard: error: tinyheads:A_MODULE_INSTANCE is an instance of Linear (pass "
                                      f"the class, or a HeadSpec whose head builds it), {NOT_A_SUBJECT}"),
    (["tinyheads:NOT_A_MODULE_CLASS"], "headguard: error: tinyheads:NOT_A_MODULE_CLASS is the class dict, which is "
                                       f"not an nn.Module subclass, {NOT_A_SUBJECT}"),
    (["tinyheads:NeedsDepth"], "headguard: error: tinyheads:NeedsDepth(nc=2, ch=(16, 32, 64)) raised TypeError: "
                               "NeedsDepth.__init__() got an unexpected keyword argument 'nc'; a head must accept nc "
                               "and ch, or use HeadSpec(head_kwargs=...)"),
    (["tinyheads:BAD_LOSS"], "headguard: error: tinyheads:BAD_LOSS has loss=42, which is not callable; expected a "
                             "callable that takes the built head and returns the criterion"),
    (["tinyheads:TINY_TYPO"], "headguard: error: unknown check name 'check_pases' in the expected_failures of "
                              "tinyheads:TINY_TYPO; did you mean 'check_passes'? (`headguard list` shows all 7 "
                              "checks)"),
    (["tinyheads"], "headguard: error: expected TARGET as module:attr (for example heads:Polygon), got 'tinyheads'"),
    (["tinyheads:TINY", "--select", "check_pass"], "headguard: error: unknown check name 'check_pass' in --select; "
                                                   "did you mean 'check_passes'? (`headguard list` shows all 7 "
                                                   "checks)"),
    (["tinyheads:TINY", "--deselect", "nope"], "headguard: error: unknown check name 'nope' in --deselect "
                                               "(`headguard list` shows all 7 checks)"),
    (["--select", "check_fails", "tinyheads:TINY"], "headguard: error: 'tinyheads:TINY' after --select looks like a "
                                                    "TARGET; put TARGETs before --select"),
    (["--profile", "slow"], "headguard check: error: argument --profile: invalid choice: 'slow' (choose from "
                            "'headguard-dev', 'headguard-ci', 'headguard-fuzz', 'dev', 'ci', 'fuzz') (see headguard "
                            "check --help)"),
]


@pytest.mark.parametrize(("argv", "line"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_and_import_errors_exit_2_with_one_line(capsys, argv, line):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    # argparse quotes choices differently across Python versions.
    assert one_line(err).replace("'", "") == line.replace("'", "")


def test_no_check_runs_when_one_target_is_bad(capsys):
    code, out, err = run(capsys, "tinyheads:TINY", "tinyheads:Missing")
    assert code == 2 and out == "" and "Missing" in err


def test_progress_is_live_only_on_a_terminal_outside_ci(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    result = CheckResult("a:B", "check_fails", "failed", 0.1, message="it broke")
    outputs = {}
    for label, stream, ci in [("tty", Terminal(), None), ("pipe", io.StringIO(), None), ("tty_ci", Terminal(), "1")]:
        if ci:
            monkeypatch.setenv("CI", ci)
        else:
            monkeypatch.delenv("CI", raising=False)
        progress = Progress(1, stream=stream)
        progress.on_start(_Subject(), _fakes.CATALOGUE[1])
        progress.on_finish(result)
        progress.close()
        outputs[label] = stream.getvalue()
    assert "[1/1] a:B check_fails ..." in outputs["tty"] and "FAILED: it broke" in outputs["tty"]
    assert outputs["pipe"] == outputs["tty_ci"] == ""


class _Subject:
    name = "a:B"


def test_console_script_smoke(target_dir):
    """The installed `headguard` script reaches main() and exits with its code (one subprocess: it is slow)."""
    entry = subprocess.run(["headguard", "check", "tinyheads:NeedsDepth"], capture_output=True, text=True,
                           cwd=target_dir, timeout=120)
    assert entry.returncode == 2, entry.stderr
    assert one_line(entry.stderr).startswith("headguard: error: tinyheads:NeedsDepth(nc=2, ch=(16, 32, 64)) raised")


def test_exitfirst_stops_at_the_first_failure(capsys, tmp_path):
    path = tmp_path / "r.json"
    code, _, _ = run(capsys, "tinyheads:TINY", "tinyheads:TINY_POLY", "-x", "--json", str(path))
    assert code == 1
    assert [r["name"] for r in json.loads(path.read_text())["results"]] == ["check_passes", "check_fails"]


def test_list_shows_every_check_with_its_property_and_what_it_draws(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    checks, draws = lines[0::2], lines[1::2]
    assert [line.split()[0] for line in checks] == [c.name for c in _fakes.CATALOGUE]
    assert checks[5].split()[1:3] == ["loss", "Only"] and checks[5].endswith("[needs polygons]")
    assert all(line.split()[0] == "draws:" for line in draws)
    assert draws[0].split("draws: ")[1] == "fixed inputs (its docstring says why)"


def test_list_of_the_catalogue_names_each_checks_inputs(capsys):
    load_catalogue()
    with using_catalogue(CATALOGUE):
        assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = lines.index(next(line for line in lines if line.startswith("check_finite_outputs_extreme_inputs ")))
    assert lines[row + 1].split("draws: ")[1].startswith("feats: feature maps (batch 1-3, images up to 80 px, ")
    assert "init: initialisations (as shipped;" in lines[row + 1] and "variants: (mode=train), (mode=eval)" in lines[row + 1]


@pytest.mark.parametrize("option", ["--json", "--junit"])
def test_unwritable_report_path_is_refused_before_the_run(capsys, tmp_path, option):
    code, out, err = run(capsys, "tinyheads:TINY", "--select", "check_passes", option, str(tmp_path))
    assert code == 2 and out == ""
    assert one_line(err) == f"headguard: error: cannot write {option} {tmp_path}: Is a directory"
