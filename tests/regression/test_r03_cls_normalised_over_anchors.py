"""R3 — to hide R1, the polygon loss divided the class BCE by anchors x classes instead of max(1, sum of target
scores): the cls item looked small and the class gradient shrank by N_anchors x nc / N_positive."""

from __future__ import annotations

import torch

import mutants
from headguard.testing import detached_preds, features, ordinary_targets, train_preds

CHECK = "check_polygon_detection_terms_match"


def _cls_item_and_grad(spec):
    """(cls item, cls-term gradient w.r.t. the class logits, B * A * nc, max(1, sum of target scores))."""
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    feats = features(subject, batch=2, image_size=(64, 64))
    preds = detached_preds(train_preds(subject, head, feats), requires_grad=True)
    terms = mutants.build_loss(spec, head).terms(preds, ordinary_targets(subject, 2))
    (cls_term,) = terms.vector[2:3]
    cls_term.backward()
    b, nc, a = preds["scores"].shape
    return float(cls_term.detach()), preds["scores"].grad, b * a * nc, float(terms.detection.target_scores_sum)


def test_symptom_cls_item_looks_small_and_its_gradient_shrinks():
    item, grad, elements, tss = _cls_item_and_grad(mutants.R3_SPEC)
    ref_item, ref_grad, _, ref_tss = _cls_item_and_grad(mutants.REFERENCE)
    assert tss == ref_tss
    shrink = elements / tss  # here 2 images * 64 anchors * 2 classes / the target-score sum
    assert item < ref_item / 10 and item < 0.02, (item, ref_item)
    torch.testing.assert_close(grad * shrink, ref_grad, rtol=1e-4, atol=1e-9)
    assert shrink > 10


def test_check_fails_on_mutant():
    assert "detection terms differ" in mutants.failure_message(mutants.R3_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
