"""DetectionLoss properties: background batches (R10), normalisation (R3), batch invariances (R4, R5), targets API."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads import Detect
from losses import AssignerConfig, DetectionGains, DetectionLoss

STRIDES = (8.0, 16.0, 32.0)


def _preds(batch, nc=2, size=64, seed=0, score_shift=-2.0):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(batch, 1, size // int(s), size // int(s)) for s in STRIDES]
    a = sum(f.shape[2] * f.shape[3] for f in feats)
    return {
        "boxes": torch.randn(batch, 64, a, generator=gen).requires_grad_(),
        "scores": (torch.randn(batch, nc, a, generator=gen) + score_shift).requires_grad_(),
        "feats": feats,
    }


def _batch(per_image, nc=2, seed=0):
    gen = torch.Generator().manual_seed(seed + 7)
    n = sum(per_image)
    return {
        "batch_idx": torch.repeat_interleave(torch.arange(len(per_image)), torch.tensor(per_image)).float(),
        "cls": torch.randint(0, nc, (n, 1), generator=gen).float(),
        "bboxes": torch.cat((torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.5 + 0.05), 1),
    }


def _sub(preds, i):
    return {"boxes": preds["boxes"][i : i + 1], "scores": preds["scores"][i : i + 1], "feats": [f[i : i + 1] for f in preds["feats"]]}


@given(batch=st.integers(1, 4), seed=st.integers(0, 1000))
def test_background_batch_is_finite_with_zero_box_terms_r10(batch, seed):
    preds = _preds(batch, seed=seed)
    vec, items = DetectionLoss(2, STRIDES)(preds, _batch([0] * batch))
    assert bool(torch.isfinite(vec).all())
    assert items["box_loss"].item() == 0 and items["dfl_loss"].item() == 0
    # All-negative class targets, normalised by max(1, 0) = 1: plain BCE sum against zeros, times the gain.
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        preds["scores"], torch.zeros_like(preds["scores"]), reduction="sum"
    ) * 0.5
    torch.testing.assert_close(items["cls_loss"], expected.detach())
    grads = torch.autograd.grad(vec.sum(), (preds["boxes"], preds["scores"]), allow_unused=True)
    assert grads[0] is None or bool((grads[0] == 0).all())
    assert bool(torch.isfinite(grads[1]).all())


@given(seed=st.integers(0, 1000))
def test_cls_term_is_normalised_by_target_score_sum_r3(seed):
    preds, batch = _preds(2, seed=seed), _batch([3, 2], seed=seed)
    loss = DetectionLoss(2, STRIDES)
    terms, targets = loss.detection_terms(preds, batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        preds["scores"].transpose(1, 2), targets.target_scores, reduction="sum"
    )
    expected = bce / targets.target_scores.sum().clamp(min=1) * 0.5
    torch.testing.assert_close(terms[1], expected)
    assert targets.target_scores_sum.item() == max(1.0, targets.target_scores.sum().item())


@given(k=st.integers(2, 4), seed=st.integers(0, 1000))
def test_items_unchanged_by_replication_up_to_the_max1_floor_r4(k, seed):
    one, batch = _preds(1, seed=seed), _batch([4], seed=seed)
    many = {key: (torch.cat([v.detach()] * k) if key != "feats" else [torch.cat([f] * k) for f in v]) for key, v in one.items()}
    many_batch = {
        "batch_idx": torch.arange(k).repeat_interleave(4).float(),
        "cls": batch["cls"].repeat(k, 1),
        "bboxes": batch["bboxes"].repeat(k, 1),
    }
    loss = DetectionLoss(2, STRIDES)
    vec1, items1 = loss(one, batch)
    veck, itemsk = loss(many, many_batch)
    # Numerators grow k-fold and so does the target-score sum, except where max(1, .) binds.
    t = loss.detection_terms(one, batch)[1].target_scores.sum().item()
    factor = k * max(1.0, t) / max(1.0, k * t)
    for key in items1:
        torch.testing.assert_close(itemsk[key], items1[key] * factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(veck, vec1.detach() * k * factor, rtol=1e-5, atol=1e-5)


@given(seed=st.integers(0, 1000))
def test_per_image_targets_map_back_to_the_right_rows_r5(seed):
    """gt_rows turns each positive's per-image target_gt_idx into its flat batch row, whose box is the target box."""
    preds = _preds(3, seed=seed)
    batch = _batch([2, 0, 3], seed=seed)
    # Shuffle the flat rows: the per-image slot order follows the original order within each image.
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    shuffled = {k: v[perm] for k, v in batch.items()}
    _, targets = DetectionLoss(2, STRIDES).detection_terms(preds, shuffled)
    img, anchor = targets.fg_mask.nonzero(as_tuple=True)
    rows = targets.gt_rows[img, targets.target_gt_idx[img, anchor]]
    assert bool((rows >= 0).all())
    assert torch.equal(shuffled["batch_idx"][rows].long(), img)
    h, w = targets.imgsz.tolist()
    xywh = shuffled["bboxes"][rows] * torch.tensor([w, h, w, h])
    expected = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
    torch.testing.assert_close(targets.target_bboxes[img, anchor], expected)
    assert int(targets.mask_gt.sum()) == 5 and bool((targets.gt_rows[~targets.mask_gt] == -1).all())


@given(seed=st.integers(0, 1000))
def test_row_order_across_images_does_not_matter(seed):
    preds, batch = _preds(3, seed=seed), _batch([2, 1, 3], seed=seed)
    order = torch.tensor([3, 0, 4, 2, 1, 5])  # interleaves images, keeps the order within each image
    assert all(
        [int(i) for i in order if batch["batch_idx"][i] == img] == sorted(int(i) for i in order if batch["batch_idx"][i] == img)
        for img in range(3)
    )
    loss = DetectionLoss(2, STRIDES)
    a, _ = loss(preds, batch)
    b, _ = loss(preds, {k: v[order] for k, v in batch.items()})
    assert torch.equal(a, b)


def test_loss_returns_vector_times_batch_and_detached_items():
    preds, batch = _preds(3), _batch([1, 2, 0])
    vec, items = DetectionLoss(2, STRIDES)(preds, batch)
    terms, _ = DetectionLoss(2, STRIDES).detection_terms(preds, batch)
    torch.testing.assert_close(vec, terms * 3)
    assert list(items) == ["box_loss", "cls_loss", "dfl_loss"]
    assert all(v.ndim == 0 and not v.requires_grad for v in items.values())
    assert vec.requires_grad


def test_gains_scale_each_term():
    preds, batch = _preds(2), _batch([2, 2])
    base, _ = DetectionLoss(2, STRIDES).detection_terms(preds, batch)
    scaled, _ = DetectionLoss(2, STRIDES, gains=DetectionGains(box=1.0, cls=1.0, dfl=1.0)).detection_terms(preds, batch)
    torch.testing.assert_close(base, scaled * torch.tensor([7.5, 0.5, 1.5]))


def test_for_head_reads_nc_reg_max_and_stride():
    head = Detect(nc=3, reg_max=8, ch=(8, 16, 32))
    head.stride = torch.tensor(STRIDES)
    loss = DetectionLoss.for_head(head, assigner=AssignerConfig(topk=5))
    assert (loss.nc, loss.reg_max, loss.strides, loss.assigner.topk) == (3, 8, STRIDES, 5)
    unset = Detect(nc=3, ch=(8, 16, 32))
    with pytest.raises(ValueError, match="set the head's stride first"):
        DetectionLoss.for_head(unset)


def test_loss_does_not_modify_its_inputs():
    preds, batch = _preds(2), _batch([2, 1])
    before = {k: v.detach().clone() for k, v in {**batch, "boxes": preds["boxes"], "scores": preds["scores"]}.items()}
    DetectionLoss(2, STRIDES)(preds, batch)
    after = {**batch, "boxes": preds["boxes"], "scores": preds["scores"]}
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v), k


def test_ensure_coverage_restores_box_loss_under_wild_predictions_r11():
    """Zero-size predicted boxes: every CIoU clamps to 0, every alignment metric is 0. The Ultralytics-compatible
    assigner then gives every positive a zero target score, so the box and DFL terms are exactly 0 although objects
    exist; with ensure_coverage each object gets a weighted positive and the box terms come back."""
    preds = _preds(2)
    with torch.no_grad():
        preds["boxes"].zero_()
        preds["boxes"].view(2, 4, 16, -1)[:, :, 0] = 50.0  # all mass on bin 0: distances ~ 0
    batch = _batch([2, 3])
    _, plain = DetectionLoss(2, STRIDES)(preds, batch)
    _, covered = DetectionLoss(2, STRIDES, assigner=AssignerConfig(ensure_coverage=True))(preds, batch)
    assert plain["box_loss"].item() == 0 and plain["dfl_loss"].item() == 0
    assert covered["box_loss"].item() > 0 and covered["dfl_loss"].item() > 0
    _, targets = DetectionLoss(2, STRIDES, assigner=AssignerConfig(ensure_coverage=True)).detection_terms(preds, batch)
    weighted = targets.fg_mask & (targets.target_scores.sum(-1) > 0)
    for img, count in enumerate([2, 3]):
        assert set(targets.target_gt_idx[img][weighted[img]].tolist()) == set(range(count))


def test_too_few_anchors_for_topk_is_a_clear_error():
    from losses import LossInputError

    preds, batch = _preds(1, size=16), _batch([1])
    with pytest.raises(LossInputError, match=r"got 5 anchors; expected at least topk = 10"):
        DetectionLoss(2, STRIDES)(preds, batch)


@given(images=st.lists(st.integers(0, 3), max_size=30), extra=st.integers(0, 3))
def test_fill_slots_keeps_each_images_rows_in_order(images, extra):
    """Image i's rows land in its slots 0, 1, ... in the order they come in the batch; the other slots are padding."""
    batch_idx = torch.tensor(images, dtype=torch.long)
    counts = DetectionLoss.image_counts(batch_idx, 4)
    n = int(counts.max()) + extra if images else extra
    cls = torch.arange(len(images), dtype=torch.float32)  # the row number, to see where each row went
    bboxes = torch.rand(len(images), 4) * 0.5 + 0.25
    slots = DetectionLoss.fill_slots(batch_idx, cls, bboxes, counts, n, torch.tensor([64.0, 64.0]))
    for image in range(4):
        rows = [r for r, i in enumerate(images) if i == image]
        assert slots.rows[image, : len(rows)].tolist() == rows
        assert slots.labels[image, : len(rows), 0].tolist() == [float(r) for r in rows]
        assert slots.mask[image].tolist() == [True] * len(rows) + [False] * (n - len(rows))
        assert (slots.rows[image, len(rows):] == -1).all()
