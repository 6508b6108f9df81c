"""R10 — with no objects in a batch, the class loss divided by a target-score sum of 0 (reported upstream)."""

from __future__ import annotations

import torch

import losses
import mutants
from headguard.testing import detached_preds, features, ordinary_targets, train_preds

CHECK = "check_loss_all_background"


def _empty_batch_loss(loss_cls):
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    feats = features(subject, batch=2, image_size=(64, 64))
    preds = detached_preds(train_preds(subject, head, feats), requires_grad=True)
    vector, items = loss_cls.for_head(head)(preds, ordinary_targets(subject, 2, per_image=0))
    return vector, items


def test_symptom_empty_batch_gives_a_non_finite_loss():
    vector, items = _empty_batch_loss(mutants.PolygonLossUnclampedNormaliser)
    assert not bool(torch.isfinite(items["cls_loss"]))
    assert not bool(torch.isfinite(vector).all())


def test_reference_empty_batch_is_finite_with_zero_box_terms():
    vector, items = _empty_batch_loss(losses.PolygonLoss)
    assert bool(torch.isfinite(vector).all()) and float(items["cls_loss"]) > 0
    assert [float(items[k]) for k in ("box_loss", "polygon_loss", "dfl_loss")] == [0.0, 0.0, 0.0]


def test_check_fails_on_mutant():
    assert "all-background batch is non-finite" in mutants.failure_message(mutants.R10_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
