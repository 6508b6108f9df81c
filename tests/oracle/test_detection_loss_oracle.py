"""losses.DetectionLoss equals Ultralytics 8.4.190's v8DetectionLoss: vector, items and gradients."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headguard.adapters.ultralytics import v8_detection_loss
from losses import DetectionGains, DetectionLoss

from . import _ultralytics  # noqa: F401  (skips the module when Ultralytics is missing)

STRIDES = (8.0, 16.0, 32.0)


@st.composite
def loss_cases(draw):
    """A batch (sorted batch_idx, as Ultralytics' collate produces), random head outputs and a generator seed."""
    nc = draw(st.sampled_from([1, 80]))
    batch_size = draw(st.integers(1, 8))
    size = draw(st.sampled_from([64, 96, 128]))
    per_image = draw(
        st.one_of(
            st.just([0] * batch_size),  # all background
            st.lists(st.integers(0, 1), min_size=batch_size, max_size=batch_size),  # at most one object each
            st.lists(st.integers(0, 12), min_size=batch_size, max_size=batch_size),  # many
        )
    )
    seed = draw(st.integers(0, 2**31 - 1))
    score_shift = draw(st.sampled_from([-6.0, -3.0, 0.0, 2.0]))
    box_scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    return nc, batch_size, size, per_image, seed, score_shift, box_scale


def _make(nc, batch_size, size, per_image, seed, score_shift, box_scale):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(batch_size, 1, size // int(s), size // int(s)) for s in STRIDES]
    anchors = sum(f.shape[2] * f.shape[3] for f in feats)
    boxes = (torch.randn(batch_size, 64, anchors, generator=gen) * box_scale).requires_grad_()
    scores = (torch.randn(batch_size, nc, anchors, generator=gen) + score_shift).requires_grad_()
    n = sum(per_image)
    batch_idx = torch.repeat_interleave(torch.arange(batch_size), torch.tensor(per_image)).float()
    # Centres away from the origin: Ultralytics treats a box whose xyxy coordinates sum to <= 0 as padding.
    centres = torch.rand(n, 2, generator=gen) * 0.9 + 0.05
    sides = torch.rand(n, 2, generator=gen) ** 2 * 0.7  # many small boxes, to exercise the enlargement
    batch = {
        "batch_idx": batch_idx,
        "cls": torch.randint(0, nc, (n, 1), generator=gen).float(),
        "bboxes": torch.cat((centres, sides), 1),
    }
    return {"boxes": boxes, "scores": scores, "feats": feats}, batch


@settings(max_examples=100)
@given(case=loss_cases())
def test_detection_loss_equals_v8_detection_loss(case):
    nc = case[0]
    preds, batch = _make(*case)
    ours, theirs = DetectionLoss(nc, STRIDES), v8_detection_loss(nc, STRIDES)
    vec, items = ours(preds, batch)
    ref_vec, ref_items = theirs(preds, batch)
    torch.testing.assert_close(vec, ref_vec, rtol=1e-5, atol=1e-6)
    assert list(items) == list(ref_items) == ["box_loss", "cls_loss", "dfl_loss"]
    for key in items:
        assert not items[key].requires_grad
        torch.testing.assert_close(items[key], ref_items[key], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(vec.sum(), (preds["boxes"], preds["scores"]))
    ref_grads = torch.autograd.grad(ref_vec.sum(), (preds["boxes"], preds["scores"]))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_eval_tuple_is_accepted_like_parse_output():
    preds, batch = _make(1, 2, 64, [3, 1], 0, -3.0, 2.0)
    loss = DetectionLoss(1, STRIDES)
    vec, _ = loss((torch.zeros(1), preds), batch)
    ref_vec, _ = v8_detection_loss(1, STRIDES)((torch.zeros(1), preds), batch)
    torch.testing.assert_close(vec, ref_vec, rtol=1e-5, atol=1e-6)


def test_gains_scale_the_terms_like_hyp():
    preds, batch = _make(1, 2, 64, [2, 2], 1, 0.0, 2.0)
    gains = DetectionGains(box=1.0, cls=2.0, dfl=0.25)
    vec, _ = DetectionLoss(1, STRIDES, gains=gains)(preds, batch)
    ref_vec, _ = v8_detection_loss(1, STRIDES, gains={"box": 1.0, "cls": 2.0, "dfl": 0.25})(preds, batch)
    torch.testing.assert_close(vec, ref_vec, rtol=1e-5, atol=1e-6)
