"""Ultralytics 8.4's own task heads, checked with their own losses (issue 9): each resolves with no spec, its verdict's
failures are exactly the upstream findings written up in docs/reports/, and mutants on their layout are caught."""

from __future__ import annotations

import pathlib

import pytest
import torch

import heads
from headguard.adapters.ultralytics import default_spec_for
from headguard.runner import run_checks, select_checks
from headguard.targets import resolve_target, subject_from

pytest.importorskip("ultralytics")
from ultralytics.nn.modules import head as ultralytics_heads  # noqa: E402

REPORTS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "reports"
# head -> (its task loss, the loss's item names)
LOSSES = {
    "Detect": ("v8DetectionLoss", ("box_loss", "cls_loss", "dfl_loss")),
    "Segment": ("v8SegmentationLoss", ("box_loss", "seg_loss", "cls_loss", "dfl_loss", "sem_loss")),
    "Pose": ("v8PoseLoss", ("box_loss", "pose_loss", "kobj_loss", "cls_loss", "dfl_loss")),
    "OBB": ("v8OBBLoss", ("box_loss", "cls_loss", "dfl_loss", "angle_loss")),
}
# The upstream findings of each head's verdict (docs/reports/ultralytics-<head>.md), by check.
FINDINGS = {
    "Detect": {"check_loss_rejects_nonfinite", "check_loss_dtype_matrix"},
    "Segment": {"check_loss_dtype_matrix", "check_loss_finite_degenerate_targets"},
    "Pose": {"check_loss_dtype_matrix"},
    "OBB": {"check_loss_dtype_matrix"},
}
# Checks whose every input carries the task's targets (keypoints, masks, rotated boxes), so each head must pass them;
# check_assigner_coverage is R11, expected to fail for its cause.
TASK_READERS = ["check_loss_all_background", "check_loss_batch_decomposition", "check_loss_target_order_invariant",
                "check_loss_pure", "check_initial_cls_loss_bounded", "check_assigner_coverage"]


def target(name: str) -> str:
    return f"ultralytics.nn.modules.head:{name}"


def criterion_of(subject):
    """The subject's criterion without headguard's layout wrappers around it."""
    criterion = subject.build_loss(subject.build_head())
    while hasattr(criterion, "criterion"):
        criterion = criterion.criterion
    return criterion


def verdict(subject, names) -> dict[str, str]:
    return {r.name: r.status for r in run_checks(subject, select_checks(subject, select=names), profile="ci")}


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_head_resolves_with_its_own_loss_named(name):
    subject = resolve_target(target(name))
    loss_class, items = LOSSES[name]
    assert subject.loss_factory.__qualname__ == f"ultralytics_loss({loss_class})"
    criterion = criterion_of(subject)
    assert type(criterion).__name__ == loss_class and tuple(criterion.loss_names) == items
    assert "check_assigner_coverage" in subject.expected_failures


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_verdicts_failures_are_exactly_the_documented_findings(name):
    subject = resolve_target(target(name))
    got = verdict(subject, sorted(FINDINGS[name]) + TASK_READERS)
    failed = {check for check, status in got.items() if status in ("failed", "error")}
    assert failed == FINDINGS[name], got
    assert got["check_assigner_coverage"] == "xfailed", got
    report = (REPORTS / f"ultralytics-{name.lower()}.md").read_text()
    assert all(f"`{check}`" in report for check in FINDINGS[name])


def test_the_default_spec_follows_the_class_not_its_name():
    assert default_spec_for(heads.Detect) is None  # ours: the reference spec
    assert default_spec_for(ultralytics_heads.Pose26) is None  # YOLO26's trainer builds PoseLoss26, not v8PoseLoss

    class MyPose(ultralytics_heads.Pose):
        pass

    assert default_spec_for(MyPose).loss.__qualname__ == "ultralytics_loss(v8PoseLoss)"


class PoseForgetsPriors(ultralytics_heads.Pose):
    """R1 on the Pose layout: an override of bias_init() that sets the keypoint branch and forgets the parent's."""

    def bias_init(self):
        for branch in self.cv4:
            branch[-1].bias.data.zero_()


class OBBClampedAtInference(ultralytics_heads.OBB):
    """An inference-only clamp: decoded boxes limited to 16 px (a canvas size baked in), training untouched."""

    def _inference(self, x):
        y = super()._inference(x)
        return torch.cat((y[:, :4].clamp(max=16.0), y[:, 4:]), 1)


def test_a_pose_whose_bias_init_forgets_the_parents_fails_the_class_prior():
    subject = subject_from(PoseForgetsPriors, name="mutants:PoseForgetsPriors")
    assert subject.loss_factory.__qualname__ == "ultralytics_loss(v8PoseLoss)"
    assert verdict(subject, ["check_class_prior"])["check_class_prior"] == "failed"
    assert verdict(resolve_target(target("Pose")), ["check_class_prior"])["check_class_prior"] == "passed"


def test_an_obb_clamped_at_inference_fails_the_initial_predictions():
    subject = subject_from(OBBClampedAtInference, name="mutants:OBBClampedAtInference")
    assert verdict(subject, ["check_initial_predictions_sane"])["check_initial_predictions_sane"] == "failed"
    assert verdict(resolve_target(target("OBB")), ["check_initial_predictions_sane"])[
        "check_initial_predictions_sane"] == "passed"


def test_the_dtype_matrix_reports_only_the_dtype_finding_on_segment():
    """Segment's loss is NaN on a zero-width box (check_loss_finite_degenerate_targets' finding); the dtype matrix
    draws ordinary objects, so that NaN is not reported again under float32 x float32 (it was, 8 extra failures)."""
    subject = resolve_target(target("Segment"))
    result = run_checks(subject, select_checks(subject, select=["check_loss_dtype_matrix"]), profile="ci")[-1]
    calls = {f.message.split(":", 1)[0] for f in result.failures}
    assert calls == {f"check_loss_dtype_matrix(pred={p}, target={t})"
                     for p in ("float32", "float64", "bfloat16", "float16") for t in ("float64", "float16")}, calls
