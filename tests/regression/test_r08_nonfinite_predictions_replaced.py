"""R8 — the loss replaced NaN/Inf class logits with -10 (and box/vertex outputs with 0): training went on with a
finite loss computed from corrupted weights."""

from __future__ import annotations

import math

import pytest
import torch

import losses
import mutants
from headguard.testing import detached_preds, features, ordinary_targets, train_preds

CHECK = "check_loss_rejects_nonfinite"


def _with_nan(key: str):
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    preds = detached_preds(train_preds(subject, head, features(subject, batch=2, image_size=(64, 64))))
    preds[key].view(-1)[7] = math.nan
    return head, preds, ordinary_targets(subject, 2)


@pytest.mark.parametrize("key", ["scores", "boxes", "polygons"])
def test_symptom_quiet_finite_loss(key):
    head, preds, batch = _with_nan(key)
    vector, _ = mutants.build_loss(mutants.R8_SPEC, head)(preds, batch)
    assert bool(torch.isfinite(vector).all())


@pytest.mark.parametrize("key", ["scores", "boxes", "polygons"])
def test_reference_raises_naming_the_tensor(key):
    head, preds, batch = _with_nan(key)
    with pytest.raises(losses.LossInputError, match=rf"preds\['{key}'\] has 1 non-finite"):
        losses.PolygonLoss.for_head(head)(preds, batch)


def test_check_fails_on_mutant():
    assert "a non-finite prediction must raise" in mutants.failure_message(mutants.R8_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
