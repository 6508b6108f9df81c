"""docs/epoch4_nan.py, the measurements behind docs/epoch4-nan.md, on a short story: every shipped fix leaves all eval
outputs NaN after the skipped step while the loss falls; restoring the skipped step's buffers leaves none."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "epoch4_nan.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("docs_epoch4_nan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


epoch4 = _load_script()
STORY = epoch4.Story(before=3, after=3)
K = STORY.overflow_step
SHIPPED = [s for s in epoch4.SETUPS if s.name != "cure"]


@pytest.fixture(scope="module")
def runs():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {run.setup.name: run for run in epoch4.run_all(STORY)}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("setup", SHIPPED, ids=lambda s: s.name)
def test_each_shipped_fix_leaves_every_eval_output_nan(runs, setup):
    run = runs[setup.name]
    assert run.skipped == [i == K for i in range(len(run.skipped))], run.skipped
    assert run.nan_percent[:K] == [0.0] * K, run.nan_percent
    assert run.nan_percent[K:] == [100.0] * (len(run.nan_percent) - K), run.nan_percent
    assert run.level_nan_percent == [100.0, 100.0, 100.0]
    assert run.final_bad_buffers and all(".bn.running_" in name for name in run.final_bad_buffers)


@pytest.mark.parametrize("setup", epoch4.SETUPS, ids=lambda s: s.name)
def test_training_loss_falls_over_the_normal_steps(runs, setup):
    loss = runs[setup.name].loss
    normal = [v for i, v in enumerate(loss) if i != K]
    assert all(math.isfinite(v) for v in normal), loss
    assert loss[K - 1] < loss[0] and loss[-1] < loss[K + 1], loss


def test_masking_the_loss_gives_a_finite_loss_but_the_step_is_still_skipped(runs):
    run = runs["fix-nan-to-minus-10"]
    assert math.isfinite(run.loss[K]) and math.isnan(run.grad_norm[K]) and run.skipped[K]


def test_the_cure_leaves_no_nan_and_trains_exactly_as_without_it(runs):
    cure, shipped = runs["cure"], runs["all-three-fixes"]
    assert cure.skipped[K] and cure.final_bad_buffers == []
    assert cure.nan_percent == [0.0] * len(cure.nan_percent)
    # Train mode normalises with batch statistics: restoring the running ones changes no training step.
    assert cure.loss[:K] == shipped.loss[:K] and cure.loss[K + 1 :] == shipped.loss[K + 1 :]


def test_one_nan_channel_of_running_var_reaches_every_anchor_of_its_level():
    scores, levels = epoch4.one_poisoned_channel(epoch4.Story(before=1, after=0))
    assert scores == 100.0
    assert levels[0] > 0 and levels[1:] == [0.0, 0.0], levels


def test_overflow_is_inf_after_the_fp16_cast():
    (bad,) = epoch4.overflowing([torch.zeros(1, 2, 2, 2)], STORY.overflow)
    assert STORY.overflow > epoch4.FP16_MAX and bad[0, 0, 0, 0].item() == math.inf
    assert int(torch.isinf(bad).sum()) == 1


def test_headguard_check_fails_on_the_team_step_and_passes_on_the_reference():
    messages = epoch4.check_messages()
    status, message = messages["team_step"]
    assert status == "failed" and "bn.running_mean" in message, messages
    assert messages["train_step"][0] == "passed", messages


def test_figures_are_pngs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    (path,) = epoch4.write_figures([runs["cure"]], STORY, tmp_path)
    assert path.name == "epoch4-nan-cure.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
