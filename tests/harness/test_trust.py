"""A runner you can trust (issue 8): the same command gives the same verdict, nothing hangs, nothing goes green with
nothing checked, one target cannot change the next one's verdicts, and misuse is one clear error. Each test runs the
real CLI (in-process) on a target from `_trustheads.py` that misbehaves the way real heads and losses do."""

from __future__ import annotations

import json
import pathlib
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import heads
from headguard import targets
from headguard.cli import main
from headguard import CATALOGUE
from headguard.registry import CheckContext
from headguard.runner import using_catalogue
from headguard.targets import resolve_target

from ._fakes import check_passes, make_check

HERE = pathlib.Path(__file__).parent
MODULE = "trustheads"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding `trustheads.py`, made the current directory; sys.path and imports restored after."""
    (tmp_path / f"{MODULE}.py").write_text((HERE / "_trustheads.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [m for m in sys.modules if m in (MODULE, "exits_at_import", "parses_argv")]:
        sys.modules.pop(name, None)


def check(capsys, *argv):
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def statuses(path: pathlib.Path) -> dict[tuple[str, str], str]:
    return {(r["target"], r["name"]): r["status"] for r in json.loads(path.read_text())["results"]}


# --- 1. same command, same verdict -----------------------------------------------------------------------------------

def test_the_subject_is_built_from_the_seed_not_from_the_global_generator(workdir):
    torch.manual_seed(1)
    first = resolve_target(f"{MODULE}:RandomPrior", seed=7).prototype.state_dict()
    torch.manual_seed(2)
    again = resolve_target(f"{MODULE}:RandomPrior", seed=7).prototype.state_dict()
    other = resolve_target(f"{MODULE}:RandomPrior", seed=8).prototype.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_head_near_a_threshold_gets_the_same_verdict_for_the_same_seed(workdir, capsys):
    verdicts = {}
    for seed in range(6):
        runs = set()
        for global_seed in (11, 12):  # whatever ran before in the process (another target, a test) must not matter
            torch.manual_seed(global_seed)
            runs.add(check(capsys, f"{MODULE}:RandomPrior", "--select", "check_class_prior", "--seed", str(seed))[0])
        assert len(runs) == 1, f"seed {seed}: exit codes {runs} for one command"
        verdicts[seed] = runs.pop()
    assert set(verdicts.values()) == {0, 1}, "the head should sit near the threshold: some seeds pass, some fail"


# --- 2. a hanging head -------------------------------------------------------------------------------------------------

def test_a_check_past_its_time_limit_fails_naming_where_it_was_stuck(workdir, capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, _ = check(capsys, f"{MODULE}:HANGS", "--select", "check_output_contract", "--timeout", "1",
                         "--json", str(path))
    assert code == 1
    assert statuses(path) == {(f"{MODULE}:HANGS", "check_output_contract"): "failed"}
    assert "ran past its time limit of 1 s; stuck at" in out and "trustheads.py" in out and "in forward" in out


# --- 3. never green with nothing checked --------------------------------------------------------------------------------

def test_sys_exit_in_a_forward_is_an_error_not_a_silent_pass(workdir, capsys):
    code, out, _ = check(capsys, f"{MODULE}:ExitsInEval", "--select", "check_output_contract")
    assert code == 1 and "called sys.exit(0)" in out


def test_a_module_that_exits_at_import_is_a_usage_error(workdir, capsys):
    (workdir / "exits_at_import.py").write_text("import sys\n\ndef main():\n    return 0\n\nsys.exit(main())\n")
    code, out, err = check(capsys, "exits_at_import:Head")
    assert code == 2 and out == ""
    assert "importing module 'exits_at_import' (TARGET exits_at_import:Head) called sys.exit(0)" in err


@pytest.mark.parametrize("selection", [["--select", "check_polygon_gradient_at_init"],
                                       ["--deselect", *CATALOGUE]], ids=["select-not-applicable", "deselect-all"])
def test_nothing_checked_exits_5(capsys, selection):
    code, _, err = check(capsys, "heads:Detect", *selection)
    assert code == 5 and "nothing was checked" in err


# --- 4. no leak of global torch state between targets -----------------------------------------------------------------

def test_a_target_that_changes_global_state_cannot_change_the_next_targets_verdicts(workdir, capsys, tmp_path):
    path = tmp_path / "r.json"
    chosen = ["check_output_contract", "check_class_prior", "check_every_parameter_gets_gradient"]
    check(capsys, f"{MODULE}:SetsFloat64", f"{MODULE}:DisablesGrad", "heads:Detect", "--select", *chosen,
          "--json", str(path))
    got = statuses(path)
    assert {name: got[("heads:Detect", name)] for name in chosen} == dict.fromkeys(chosen, "passed")
    doc = json.loads(path.read_text())
    assert "default_dtype torch.float32 -> torch.float64" in doc["setup_notes"][f"{MODULE}:SetsFloat64"][0]
    notes = [n for r in doc["results"] if r["target"] == f"{MODULE}:DisablesGrad" for n in r["notes"]]
    assert notes and all("grad_enabled True -> False" in n for n in notes)
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()


# --- 5. an expected failure hides only its own cause -------------------------------------------------------------------

def test_a_malformed_output_fails_the_contract_once_and_skips_the_rest(workdir, capsys, tmp_path):
    path = tmp_path / "r.json"
    code, _, _ = check(capsys, f"{MODULE}:ReturnsList", "--select", "check_assigner_coverage", "--json", str(path))
    assert code == 1
    records = json.loads(path.read_text())["results"]
    assert [(r["name"], r["status"]) for r in records] == [
        ("check_output_contract", "failed"), ("check_assigner_coverage", "skipped")]
    assert records[1]["message"].startswith("not run because check_output_contract failed: the head's ")


def test_r11_does_not_hide_a_failure_of_another_cause(workdir, capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, _ = check(capsys, f"{MODULE}:NaNScores", "--select", "check_assigner_coverage", "--json", str(path))
    assert code == 1
    assert statuses(path)[(f"{MODULE}:NaNScores", "check_assigner_coverage")] == "failed"
    assert "does not match its cause" in out


# --- 6. Ctrl-C ---------------------------------------------------------------------------------------------------------

def check_interrupted(subject, ctx):
    """The user presses Ctrl-C."""
    raise KeyboardInterrupt


def check_never_reached(subject, ctx):
    """Runs after the interrupt, so never."""


def test_ctrl_c_writes_the_partial_reports_and_one_line(workdir, capsys, tmp_path):
    jpath, xpath = tmp_path / "r.json", tmp_path / "r.xml"
    chain = [make_check(check_passes), make_check(check_interrupted), make_check(check_never_reached)]
    with using_catalogue(chain):
        code, out, err = check(capsys, f"{MODULE}:OWN_LOSS", "--json", str(jpath), "--junit", str(xpath))
    assert code == 130, err
    assert err.splitlines()[-1] == "headguard: interrupted: reported the 1 checks that finished"
    assert "Traceback" not in err + out
    doc = json.loads(jpath.read_text())
    assert doc["interrupted"] is True and [r["name"] for r in doc["results"]] == ["check_passes"]
    assert [c.get("name") for c in ET.parse(xpath).iter("testcase")] == ["check_passes"]


# --- 7. a wrong loss is caught at setup --------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "found"), [
    ("SCALAR_LOSS", "the loss returned a torch.float32 tensor of shape ()"),
    ("TUPLE_ITEMS", "the loss returned (vector, a tuple of 3) as its items"),
])
def test_a_loss_that_breaks_the_contract_is_one_usage_error(workdir, capsys, spec, found):
    code, out, err = check(capsys, f"{MODULE}:{spec}")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and found in err and "expected criterion(preds, batch) -> (loss_vector" in err


# --- 9. name shadowing and the target's own output ---------------------------------------------------------------------

def test_a_losses_module_in_the_working_directory_is_named_as_a_collision(workdir, capsys):
    (workdir / "losses.py").write_text("class MyLoss:\n    pass\n")
    code, _, err = check(capsys, f"{MODULE}:Detect")
    assert code == 2
    assert f"{workdir / 'losses.py'} shadows headguard's package 'losses'" in err


def test_a_target_that_parses_argv_at_import_sees_none_of_ours_and_its_output_is_attributed(workdir, capsys):
    (workdir / "parses_argv.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--lr', type=float, default=0.1)\n"
        "ARGS = parser.parse_args()\n"
        "print('building my model')\n"
        "from trustheads import Detect\n"
    )
    code, out, err = check(capsys, "parses_argv:Detect", "--select", "check_class_prior", "--seed", "3")
    assert code == 0, err
    assert "[import parses_argv] building my model" in err and "building my model" not in out


# --- 10. size -------------------------------------------------------------------------------------------------------------

class WideParameters(heads.Detect):
    """Detect plus 2 M parameters of magnitude 0.5 that take a gradient: float32 rounding when a step writes them back
    moves them by ~1e-4 in L2, as a large head's parameters do, although the update itself is within the bound."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wide = nn.Parameter(torch.full((2_000_000,), 0.5))

    def forward(self, x):
        out = super().forward(x)
        # Zero, with the same gradient on every element, large enough to dominate the total gradient norm.
        shift = (self.wide.mean() - 0.5) * 1e4
        if self.training:
            return {**out, "scores": out["scores"] + shift}
        return out


def test_clipping_tolerance_scales_with_the_parameters(capsys):
    subject = targets.subject_from(WideParameters, name="wide")
    CATALOGUE["check_clipping_bounds_update"](subject, CheckContext(profile="ci"))


def test_a_large_head_is_warned_about_with_an_estimate(capsys, monkeypatch):
    monkeypatch.setattr(targets, "LARGE_HEAD_PARAMETERS", 1_000)
    code, out, _ = check(capsys, "heads:Detect", "--select", "check_class_prior")
    assert code == 0
    assert "heads:Detect: heads:Detect has 0 M parameters: expect roughly" in out and "GB of memory" in out


def test_out_of_memory_is_a_resource_error_not_a_finding(workdir, capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, _ = check(capsys, f"{MODULE}:OutOfMemory", "--select", "check_output_contract", "--json", str(path))
    assert code == 1
    (record,) = json.loads(path.read_text())["results"]
    assert record["status"] == "error" and record["message"].startswith("out of memory (RuntimeError:")
    assert "not a property of the subject" in record["message"]
