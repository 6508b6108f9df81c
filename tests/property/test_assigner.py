"""task_aligned_assign: invariants of the assignment, purity, and the ensure_coverage remedy for R11."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads._decode import make_anchors
from losses import AssignerConfig, task_aligned_assign
from losses._boxes import xywh2xyxy, xyxy2xywh
from losses.assigner import _metrics

STRIDES = (8.0, 16.0, 32.0)


@st.composite
def assigner_inputs(draw):
    batch = draw(st.integers(1, 3))
    nc = draw(st.integers(1, 4))
    size = draw(st.sampled_from([64, 96, 128]))
    counts = draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(1, 1, size // int(s), size // int(s)) for s in STRIDES]
    points, strides = make_anchors(feats, STRIDES)
    anchors_px = points * strides
    a = anchors_px.shape[0]
    n = max(counts)
    centres = torch.rand(batch, n, 2, generator=gen) * size
    sides = torch.rand(batch, n, 2, generator=gen) ** 2 * size * 0.6
    gt_bboxes = xywh2xyxy(torch.cat((centres, sides), -1))
    mask_gt = (torch.arange(n).view(1, n) < torch.tensor(counts).view(batch, 1)).unsqueeze(-1)
    gt_bboxes = gt_bboxes * mask_gt  # padding rows are zeros, as the loss pads them
    gt_labels = (torch.randint(0, nc, (batch, n, 1), generator=gen) * mask_gt).float()
    ltrb = torch.rand(batch, a, 4, generator=gen) * draw(st.sampled_from([8.0, 40.0]))
    pd_bboxes = torch.cat((anchors_px - ltrb[..., :2], anchors_px + ltrb[..., 2:]), -1)
    pd_scores = torch.rand(batch, a, nc, generator=gen) ** draw(st.sampled_from([1.0, 4.0]))
    return pd_scores, pd_bboxes, anchors_px, gt_labels, gt_bboxes, mask_gt


def _enlarged(gt_bboxes, min_side=STRIDES[1]):
    xywh = xyxy2xywh(gt_bboxes)
    xywh[..., 2:] = xywh[..., 2:].clamp(min=min_side)
    return xywh2xyxy(xywh)


@given(inputs=assigner_inputs(), ensure=st.booleans())
def test_assignment_invariants(inputs, ensure):
    pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt = inputs
    out = task_aligned_assign(*inputs, strides=STRIDES, config=AssignerConfig(ensure_coverage=ensure))
    b, a, nc = pd_scores.shape
    assert out.fg_mask.shape == (b, a) and out.fg_mask.dtype == torch.bool
    assert out.target_scores.shape == (b, a, nc)
    assert bool((out.target_scores >= 0).all()) and bool((out.target_scores <= 1).all())
    assert bool((out.target_scores[~out.fg_mask] == 0).all()), "background anchors must have zero target scores"
    if gt_bboxes.shape[1] == 0:
        assert not bool(out.fg_mask.any())
        return
    img, anchor = out.fg_mask.nonzero(as_tuple=True)
    gt = out.target_gt_idx[img, anchor]
    assert bool(mask_gt[img, gt, 0].all()), "a positive anchor points at a padding slot"
    box = _enlarged(gt_bboxes)[img, gt]
    xy = anchors[anchor]
    assert bool(((xy > box[:, :2]) & (xy < box[:, 2:])).all()), "a positive lies outside its (enlarged) gt box"
    torch.testing.assert_close(out.target_bboxes[img, anchor], gt_bboxes[img, gt])
    assert torch.equal(out.target_labels[img, anchor], gt_labels[img, gt, 0].long())
    score_class = out.target_scores[img, anchor].argmax(-1)
    nonzero = out.target_scores[img, anchor].amax(-1) > 0
    assert torch.equal(score_class[nonzero], out.target_labels[img, anchor][nonzero])


@given(inputs=assigner_inputs())
def test_pure_same_inputs_same_outputs_and_inputs_untouched(inputs):
    copies = [t.clone() for t in inputs]
    first = task_aligned_assign(*inputs, strides=STRIDES)
    second = task_aligned_assign(*copies, strides=STRIDES)
    assert first.num_classes == second.num_classes
    for x, y in zip(first[:-1], second[:-1]):
        assert torch.equal(x, y)
    for t, c in zip(inputs, copies):
        assert torch.equal(t, c)


@given(inputs=assigner_inputs())
def test_dense_and_candidate_pair_metrics_agree(inputs):
    pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt = inputs
    if gt_bboxes.shape[1] == 0:
        return
    candidate = torch.ones(gt_bboxes.shape[:2] + (anchors.shape[0],), dtype=torch.bool) & mask_gt
    labels = gt_labels.long().squeeze(-1)
    dense = _metrics(pd_scores, pd_bboxes, labels, gt_bboxes, candidate, AssignerConfig(), dense=True)
    sparse = _metrics(pd_scores, pd_bboxes, labels, gt_bboxes, candidate, AssignerConfig(), dense=False)
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(d, s, rtol=1e-6, atol=1e-7)


def _starving_case():
    """Deterministic R11 starvation: small gt A (class 0) inside gt B (class 1). Every prediction is exactly B, so at
    each of A's 6 candidate anchors CIoU(B) = 1 > CIoU(A) ~ 0.12, and B's class scores make those anchors B's top
    ones. A's positives are all also B's, conflict resolution hands every one to B, and A is left with none."""
    feats = [torch.zeros(1, 1, 128 // int(s), 128 // int(s)) for s in STRIDES]
    points, strides = make_anchors(feats, STRIDES)
    anchors = points * strides
    a = anchors.shape[0]
    box_a, box_b = torch.tensor([40.0, 40.0, 52.0, 50.0]), torch.tensor([30.0, 30.0, 62.0, 62.0])
    enlarged_a = torch.tensor([38.0, 37.0, 54.0, 53.0])  # A's sides enlarged to 16 about its centre (46, 45)
    in_a = ((anchors > enlarged_a[:2]) & (anchors < enlarged_a[2:])).all(-1)
    assert int(in_a.sum()) == 6
    pd_bboxes = box_b.expand(1, a, 4).clone()
    pd_scores = torch.full((1, a, 2), 0.5)
    pd_scores[0, :, 1] = torch.where(in_a, 0.9, 0.1)
    gt_bboxes = torch.stack((box_a, box_b)).unsqueeze(0)
    labels = torch.tensor([[[0.0], [1.0]]])
    return pd_scores, pd_bboxes, anchors, labels, gt_bboxes, torch.ones(1, 2, 1, dtype=torch.bool)


def test_default_assigner_can_starve_a_gt_r11():
    out = task_aligned_assign(*_starving_case(), strides=STRIDES)
    assert bool(out.fg_mask.any()), "gt B should have positives"
    assert not bool((out.fg_mask & (out.target_gt_idx == 0)).any()), "expected gt A to be left without a positive"


def test_ensure_coverage_gives_the_starving_gt_its_nearest_in_box_anchor():
    inputs = _starving_case()
    anchors = inputs[2]
    out = task_aligned_assign(*inputs, strides=STRIDES, config=AssignerConfig(ensure_coverage=True))
    mine = (out.fg_mask & (out.target_gt_idx == 0))[0]
    assert int(mine.sum()) == 1
    anchor = int(mine.nonzero()[0, 0])
    assert out.target_scores[0, anchor, 0].item() > 0, "a rescued positive must carry loss weight"
    # All of A's candidates have equal metrics, so the tie goes to the one nearest A's centre (46, 45): (44, 44).
    assert anchors[anchor].tolist() == [44.0, 44.0]
    assert bool((out.fg_mask & (out.target_gt_idx == 1)).any()), "gt B keeps its other positives"


@given(inputs=assigner_inputs())
def test_ensure_coverage_covers_every_gt_with_candidates(inputs):
    pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt = inputs
    # Wild predictions: every box far off, so no metric is positive.
    wild = torch.zeros_like(pd_bboxes) + torch.tensor([-500.0, -500.0, -499.0, -499.0])
    out = task_aligned_assign(
        pd_scores, wild, anchors, gt_labels, gt_bboxes, mask_gt, STRIDES, AssignerConfig(ensure_coverage=True)
    )
    enlarged = _enlarged(gt_bboxes)
    for img in range(gt_bboxes.shape[0]):
        for gt in range(gt_bboxes.shape[1]):
            if not bool(mask_gt[img, gt, 0]):
                continue
            box = enlarged[img, gt]
            has_candidates = bool(((anchors > box[:2]) & (anchors < box[2:])).all(-1).any())
            mine = out.fg_mask[img] & (out.target_gt_idx[img] == gt) & (out.target_scores[img].sum(-1) > 0)
            # A gt can lose its only rescued anchor to a lower-index gt sharing it (documented); count those apart.
            if has_candidates and not bool(mine.any()):
                other = out.fg_mask[img] & ((anchors > box[:2]) & (anchors < box[2:])).all(-1)
                assert bool(other.any()), f"gt {gt} of image {img} has candidates but no positive"
            if bool(mine.any()):
                assert bool((out.target_scores[img][mine].sum(-1) > 0).all())


def test_config_is_frozen_and_validated():
    cfg = AssignerConfig()
    assert (cfg.topk, cfg.alpha, cfg.beta, cfg.eps, cfg.ensure_coverage) == (10, 0.5, 6.0, 1e-9, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.topk = 3  # type: ignore[misc]
    for topk in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"topk is {topk!r}; expected a positive int"):
            AssignerConfig(topk=topk)
