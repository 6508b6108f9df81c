"""The one-call face, `headguard.check_head`, and the one misuse error type, `headguard.UsageError`."""

from __future__ import annotations

import pytest

import headguard
import heads
import losses
from headguard import HeadSpec, UsageError, check_head


def test_check_head_returns_the_records_of_every_selected_check():
    names = ["check_output_contract", "check_class_prior", "check_loss_pure"]
    results = check_head(heads.Detect, select=names)
    assert [(r.name, r.status) for r in results] == [(n, "passed") for n in names]


def test_check_head_reports_a_failing_property_as_a_record():
    class ForgetsPriors(heads.Detect):
        def bias_init(self, *args, **kwargs):
            pass

    (result,) = [r for r in check_head(ForgetsPriors, select=["check_class_prior"]) if r.name == "check_class_prior"]
    assert result.status == "failed" and "implies a class prior" in result.message


def test_check_head_takes_a_shape_loss():
    results = check_head(losses.mgiou, select=["check_shape_loss_zero_at_match"])
    assert [(r.name, r.status) for r in results] == [("check_shape_loss_zero_at_match", "passed")]


@pytest.mark.parametrize("misuse", [
    lambda: check_head(3),
    lambda: check_head(heads.Detect, select=["check_no_such_thing"]),
    lambda: check_head(HeadSpec(heads.Detect, loss=lambda head: (lambda preds, batch: 1.0))),
    lambda: check_head(headguard.ShapeLossSpec(lambda p, t: p.sum())),
], ids=["not-a-subject", "unknown-check", "loss-contract", "shape-loss-contract"])
def test_every_misuse_is_a_usage_error(misuse):
    with pytest.raises(UsageError):
        misuse()
