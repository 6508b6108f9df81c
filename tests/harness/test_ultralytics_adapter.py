"""Ultralytics' own Detect head and v8DetectionLoss, checked through headguard.adapters.ultralytics."""

from __future__ import annotations

import pytest

from headguard import CATALOGUE, HeadSpec, build_subject
from headguard.adapters.ultralytics import detection_loss, v8_detection_loss
from headguard.registry import CheckContext, CheckFailure
from headguard.targets import subject_from

ultralytics = pytest.importorskip("ultralytics")
from ultralytics.nn.modules.head import Detect as UltralyticsDetect  # noqa: E402

CTX = CheckContext(profile="ci", seed=0)


@pytest.fixture(scope="module")
def subject():
    return build_subject(HeadSpec(head=UltralyticsDetect, loss=detection_loss), "ultralytics:Detect")


def test_the_factory_builds_v8_detection_loss_for_the_heads_settings(subject):
    criterion = subject.build_loss(subject.build_head())
    assert type(criterion).__name__ == "v8DetectionLoss"
    assert (criterion.nc, criterion.reg_max, criterion.stride.tolist()) == (2, 16, [8.0, 16.0, 32.0])
    assert v8_detection_loss(3, (8, 16), gains={"box": 1.0}).hyp.box == 1.0


def test_its_head_passes_the_head_checks(subject):
    for name in ("check_output_contract", "check_final_convs_initialised", "check_class_prior"):
        CATALOGUE[name](subject, CTX)


def test_its_loss_fails_r8_it_does_not_reject_nan_predictions(subject):
    """Found by headguard: v8DetectionLoss does not reject NaN box logits; it returns a number (NaN at a positive
    anchor, finite elsewhere) that an optimizer would step on."""
    with pytest.raises(CheckFailure, match="the loss returned a (non-)?finite value"):
        CATALOGUE["check_loss_rejects_nonfinite"](subject, CTX)


def test_its_loss_is_pure(subject):
    CATALOGUE["check_loss_pure"](subject, CTX)


def test_the_spec_keeps_the_loss_contract_from_the_command_line():
    """`headguard check` calls the criterion once at setup: v8DetectionLoss (8.4) keeps the loss contract."""
    subject = subject_from(HeadSpec(head=UltralyticsDetect, loss=detection_loss), name="ultralytics:Detect")
    assert type(subject.build_loss(subject.build_head())).__name__ == "v8DetectionLoss"
