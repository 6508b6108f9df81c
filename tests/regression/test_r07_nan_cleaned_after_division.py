"""R7 — NaN cleaned after the operation: `torch.where(isfinite(x), x, 0)` after a division makes the forward finite
while the backward of the division still gives 0 * inf = NaN: a finite loss with NaN gradients."""

from __future__ import annotations

import torch

import losses
import mutants
from headguard.testing import detached_preds, features, train_preds

CHECK = "check_gradients_finite_when_loss_finite"


def _zero_width_object_loss(loss_cls):
    """(loss vector, number of positives, gradient w.r.t. the raw vertices) for one zero-width (area 0) object."""
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    feats = features(subject, batch=1, image_size=(64, 64))
    preds = detached_preds(train_preds(subject, head, feats), requires_grad=True)
    ys = torch.linspace(0.3, 0.7, 8)
    batch = {
        "batch_idx": torch.zeros(1),
        "cls": torch.zeros(1, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 0.0, 0.4]]),  # w = 0: a vertical segment
        "polygons": torch.stack((torch.full_like(ys, 0.5), ys), -1)[None],
    }
    # Its IoU with any prediction is 0, so only the R11 remedy gives it a positive (with weight 1).
    loss = loss_cls.for_head(head, assigner=losses.AssignerConfig(ensure_coverage=True))
    terms = loss.terms(preds, batch)
    terms.vector.sum().backward()
    return terms.vector.detach(), int(terms.detection.fg_mask.sum()), preds["polygons"].grad


def test_symptom_finite_loss_nan_gradient():
    vector, positives, grad = _zero_width_object_loss(mutants.PolygonLossCleanedAfterDivision)
    assert positives > 0
    assert bool(torch.isfinite(vector).all()), vector
    assert bool(torch.isnan(grad).any())


def test_reference_loss_and_gradient_finite():
    vector, positives, grad = _zero_width_object_loss(losses.PolygonLoss)
    assert positives > 0
    assert bool(torch.isfinite(vector).all()) and bool(torch.isfinite(grad).all())


def test_check_fails_on_mutant():
    assert "but its gradient" in mutants.failure_message(mutants.R7_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
