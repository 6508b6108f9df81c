"""Range checks of the reference losses (losses/_bounds.py): a finite input never gives a non-finite loss without an
error, values outside the documented ranges raise LossInputError naming the tensor, and pixel targets are caught."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from losses import DetectionLoss, LossInputError, PolygonLoss
from losses._bounds import LOGIT_BOUND, TARGET_HIGH, TARGET_LOW, VERTEX_OFFSET_BOUND

NC, NP, REG_MAX = 2, 6, 16
STRIDES = (8.0, 16.0, 32.0)
SIZE = 64  # px: A = 8*8 + 4*4 + 2*2 = 84 anchors
A = sum((SIZE // int(s)) ** 2 for s in STRIDES)
MODES = ("l2", "mgiou", "hybrid")
LOSSES = ("detection",) + MODES


def make_loss(kind: str, cuda_graphs: bool = False):
    if kind == "detection":
        return DetectionLoss(NC, STRIDES, REG_MAX, cuda_graphs=cuda_graphs)
    return PolygonLoss(NC, STRIDES, np=NP, reg_max=REG_MAX, mode=kind, cuda_graphs=cuda_graphs)


def evaluate(kind: str, preds: dict, batch: dict, cuda_graphs: bool = False):
    """(loss vector, gradients of the prediction tensors); raises what the loss raises."""
    leaves = {k: (v if k == "feats" else v.detach().clone().requires_grad_()) for k, v in preds.items()}
    loss = make_loss(kind, cuda_graphs)
    vector, _ = loss(leaves, batch) if kind == "detection" else loss(leaves, batch, 0.5)
    vector.sum().backward()
    return vector.detach(), {k: v.grad for k, v in leaves.items() if k != "feats"}


def make_preds(seed: int = 0, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "boxes": torch.randn(batch, 4 * REG_MAX, A, generator=gen),
        "scores": torch.randn(batch, NC, A, generator=gen),
        "polygons": torch.randn(batch, 2 * NP, A, generator=gen) * 0.5,
        "feats": [torch.zeros(batch, 1, SIZE // int(s), SIZE // int(s)) for s in STRIDES],
    }


def make_batch() -> dict:
    """Three objects in two images, each with a hexagon inside its box; the last vertex of object 1 is padding."""
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.3, 0.4], [0.7, 0.6, 0.5, 0.3]])
    angles = torch.arange(NP) * (2 * math.pi / NP)
    ring = torch.stack((angles.cos(), angles.sin()), -1) / 2
    mask = torch.ones(3, NP, dtype=torch.bool)
    mask[1, -1] = False
    return {
        "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [0.0]]),
        "bboxes": boxes,
        "polygons": boxes[:, None, :2] + ring * boxes[:, None, 2:],
        "polygon_mask": mask,
    }


def raises(kind: str, preds: dict, batch: dict, cuda_graphs: bool = False) -> str:
    with pytest.raises(LossInputError) as info:
        evaluate(kind, preds, batch, cuda_graphs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ targets in pixels
PIXEL_HINT = rf"look like pixels of the {SIZE}x{SIZE} image: divide by the image size"


@pytest.mark.parametrize("kind", LOSSES)
def test_boxes_in_pixels_are_rejected_with_a_pixel_hint(kind):
    # Today's silent failure: no positive at all, box and DFL terms exactly 0, every anchor trained as background.
    batch = make_batch()
    pixels = dict(batch, bboxes=batch["bboxes"] * SIZE)
    message = raises(kind, make_preds(), pixels)
    assert message.startswith("batch['bboxes'] has 12 values outside [-1, 2] (largest 44.8, first at row 0: [32.0, ")
    assert "expected normalised xywh in [0, 1]" in message and PIXEL_HINT in message


@pytest.mark.parametrize("kind", MODES)
def test_polygons_in_pixels_are_rejected_with_a_pixel_hint(kind):
    batch = make_batch()
    message = raises(kind, make_preds(), dict(batch, polygons=batch["polygons"] * SIZE))
    # 3 objects * 6 vertices * (x, y), less the padded vertex's x and y
    assert message.startswith("batch['polygons'] (real vertices) has 34 values outside [-1, 2]")
    assert "expected normalised xy in [0, 1]" in message and PIXEL_HINT in message


@pytest.mark.parametrize("kind", MODES)
def test_padded_vertices_are_not_range_checked(kind):
    batch = make_batch()
    junk = batch["polygons"].clone()
    junk[1, -1] = 1e20  # the padded vertex: never read, so never checked
    assert torch.equal(evaluate(kind, make_preds(), dict(batch, polygons=junk))[0],
                       evaluate(kind, make_preds(), batch)[0])


@pytest.mark.parametrize("value", [1e20, -5.0])
def test_targets_far_outside_get_no_pixel_hint(value):
    batch = make_batch()
    batch["bboxes"][2, 0] = value
    message = raises("detection", make_preds(), batch)
    assert "outside [-1, 2]" in message and "look like pixels" not in message
    assert (f"largest {value:g}" if value > 0 else f"smallest {value:g}") in message and "first at row 2" in message


# The documented tolerance, written out: augmented objects may lie up to one image size outside the image.
@given(column=st.integers(0, 3), value=st.floats(-1.0, 2.0), kind=st.sampled_from(LOSSES))
def test_targets_within_one_image_size_of_the_image_are_accepted(column, value, kind):
    batch = make_batch()
    if column >= 2:
        value = abs(value)  # sizes are non-negative anyway
    batch["bboxes"][0, column] = value
    batch["polygons"][0, 0, column % 2] = value
    vector, _ = evaluate(kind, make_preds(), batch)
    assert bool(torch.isfinite(vector).all())


@given(column=st.integers(0, 3), excess=st.floats(1e-3, 1e30), kind=st.sampled_from(LOSSES))
def test_targets_beyond_one_image_size_are_rejected(column, excess, kind):
    batch = make_batch()
    batch["bboxes"][0, column] = 2.0 + excess
    message = raises(kind, make_preds(), batch)
    assert message.startswith("batch['bboxes'] has 1 values outside [-1, 2]")


# ------------------------------------------------------------------------------------------------ raw predictions
def _with(preds: dict, key: str, value: float, where=None) -> dict:
    t = preds[key].clone()
    if where is None:
        t.fill_(value)
    else:
        t[where] = value
    return dict(preds, **{key: t})


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind", MODES)
def test_one_target_vertex_at_1e20_is_rejected(kind, cuda_graphs):
    # Today: an infinite polygon term (l2, hybrid) and no error.
    batch = make_batch()
    batch["polygons"][0, 0, 0] = 1e20
    message = raises(kind, make_preds(), batch, cuda_graphs)
    assert message.startswith("batch['polygons'] (real vertices) has 1 values outside [-1, 2] (largest 1e+20, first "
                              "at [0, 0, 0])")


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind", MODES)
@pytest.mark.parametrize("where", [None, (0, 3, 17)], ids=["every", "one"])
def test_raw_vertex_offsets_at_1e20_are_rejected(kind, where, cuda_graphs):
    # Today: every raw offset at 1e20 gives an infinite l2/hybrid polygon term and no error.
    message = raises(kind, _with(make_preds(), "polygons", 1e20, where), make_batch(), cuda_graphs)
    assert message.startswith("preds['polygons'] has ")
    assert f"values outside [-{VERTEX_OFFSET_BOUND:g}, {VERTEX_OFFSET_BOUND:g}] (largest 1e+20" in message
    assert "expected raw offsets in [-1e+06, 1e+06], where the loss is guaranteed finite" in message


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("key", ["scores", "boxes"])
def test_logits_beyond_the_bound_are_rejected(key, kind, cuda_graphs):
    # Today: class logits of 3e38 give an infinite cls term, and box logits of +-1.7e38 an infinite DFL term.
    preds = make_preds()
    preds[key][0, ::2] = -3e38
    preds[key][0, 1::2] = 3e38
    message = raises(kind, preds, make_batch(), cuda_graphs)
    assert message.startswith(f"preds['{key}'] has ")
    assert f"outside [-{LOGIT_BOUND:g}, {LOGIT_BOUND:g}] (largest 3e+38" in message


@pytest.mark.parametrize("key", ["scores", "boxes", "polygons"])
def test_non_finite_predictions_still_get_the_non_finite_message(key):
    preds = _with(make_preds(), key, math.inf, (1, 0, 5))
    assert f"preds['{key}'] has 1 non-finite values (first at [1, 0, 5])" in raises("l2", preds, make_batch())


# ----------------------------------------------------------------------------- the rule, inside and outside the bounds
def _extreme_preds(seed: int, box_scale: float, cls_scale: float, vertex_scale: float) -> dict:
    """Random signs at the given magnitudes; box logits alternate in sign over the bins (the widest log-softmax)."""
    gen = torch.Generator().manual_seed(seed)
    preds = make_preds(seed)
    signs = lambda t: torch.randint(0, 2, t.shape, generator=gen).float() * 2 - 1  # noqa: E731
    bins = torch.arange(REG_MAX).remainder(2).float().mul(2).sub(1).repeat(4)[None, :, None]
    preds["boxes"] = bins * box_scale * signs(preds["boxes"][:, :1])
    preds["scores"] = signs(preds["scores"]) * cls_scale
    preds["polygons"] = signs(preds["polygons"]) * vertex_scale
    return preds


def _degenerate_batch(zero_width: bool) -> dict:
    """make_batch with targets at the ends of the accepted range, optionally a zero-area box (AREA_EPS divides)."""
    batch = make_batch()
    batch["polygons"][0, 0] = torch.tensor([TARGET_LOW, TARGET_HIGH])
    if zero_width:
        batch["bboxes"][2, 2] = 0.0
    return batch


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_width", [False, True])
def test_the_loss_and_its_gradients_are_finite_at_the_bounds(kind, dtype, zero_width):
    preds = _extreme_preds(0, LOGIT_BOUND, LOGIT_BOUND, VERTEX_OFFSET_BOUND)
    preds = {k: (v if k == "feats" else v.to(dtype)) for k, v in preds.items()}
    vector, grads = evaluate(kind, preds, _degenerate_batch(zero_width))
    assert bool(torch.isfinite(vector).all()), vector
    assert all(bool(torch.isfinite(g).all()) for g in grads.values() if g is not None)


MAGNITUDES = st.sampled_from([0.0, 1.0, 1e3, 1e6, 1e10, 1e15, 1e16, 1e20, 1e30, 3e38])


@given(seed=st.integers(0, 2**16), box=MAGNITUDES, cls=MAGNITUDES, vertex=MAGNITUDES,
       target=st.sampled_from([1.0, 3.0, 1e20]), zero_width=st.booleans(), kind=st.sampled_from(LOSSES))
def test_a_finite_input_never_gives_a_non_finite_loss_without_an_error(
    seed, box, cls, vertex, target, zero_width, kind
):
    preds = _extreme_preds(seed, box, cls, vertex)
    batch = _degenerate_batch(zero_width)
    batch["polygons"][2, 1, 0] = target
    try:
        vector, grads = evaluate(kind, preds, batch)
    except LossInputError:
        return
    assert bool(torch.isfinite(vector).all()), (vector, box, cls, vertex, target)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values() if g is not None)


@given(seed=st.integers(0, 2**16), box=MAGNITUDES, cls=MAGNITUDES, vertex=MAGNITUDES, kind=st.sampled_from(LOSSES))
def test_the_fast_path_accepts_and_rejects_what_the_reference_does(seed, box, cls, vertex, kind):
    preds, batch = _extreme_preds(seed, box, cls, vertex), make_batch()
    outcomes = []
    for cuda_graphs in (False, True):
        try:
            outcomes.append(evaluate(kind, preds, batch, cuda_graphs)[0])
        except LossInputError as err:
            outcomes.append(str(err))
    reference, fast = outcomes
    if isinstance(reference, str):
        assert fast == reference
    else:
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
