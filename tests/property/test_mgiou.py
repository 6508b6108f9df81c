"""MGIoU (losses.mgiou): the shape-loss catalogue, and what is particular to mgiou: its exact value under relative
scaling, padded vertices (masks), its documented stationary point, the convexity term of MGIoU+, boxes, dtypes, errors.

The axioms every MGIoU-family loss claims (zero at a match, bounds, symmetry, invariances, degenerate families,
gradients, batch semantics, ranking like IoU) are checks of the catalogue (headguard.checks.shape_loss), run here on
mgiou through parametrize_with_checks. Polygons come from the public strategies (headguard.strategies.polygons).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import losses
from headguard import parametrize_with_checks
from headguard import strategies as hs
from losses import LossInputError
from losses.mgiou import box_corners, convexity_loss, mgiou, mgiou_boxes
from tests._polygon_iou import signed_area

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def convex_polygons(*, min_vertices: int = 3, max_vertices: int = 8):
    """Strictly convex polygons (V, 2) float64 of ordinary size, either orientation."""
    return hs.polygons(families=("convex",), min_vertices=min_vertices, max_vertices=max_vertices)


def _loss(p: torch.Tensor, t: torch.Tensor, dtype=torch.float32, **kwargs) -> float:
    return float(mgiou(p.to(dtype)[None], t.to(dtype)[None], **kwargs)[0])


def _diameter(x: torch.Tensor) -> float:
    return float(torch.cdist(x, x).max())


def _jittered_pair(seed: int, vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded convex pair with every vertex jittered: generic, so no two vertices tie for an extreme projection."""
    gen = torch.Generator().manual_seed(seed)
    pred, target = hs.PolygonSample(seed, 1, vertices, vertices).pairs()[0]
    return tuple(x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (pred, target))


# --------------------------------------------------------------------------------------------- the catalogue
@parametrize_with_checks([losses.mgiou])
def test_mgiou_passes_the_shape_loss_catalogue(subject, check):
    check(subject)


# ------------------------------------------------------------------------------------------------ exact values
@given(convex_polygons(), st.floats(0.2, 5.0).filter(lambda s: abs(s - 1) > 1e-3))
def test_scaling_only_the_prediction_changes_the_loss_as_on_every_axis(t, scale):
    # Scaled about an inner point, the prediction's interval contains the target's (or vice versa) on every axis,
    # so every 1-D GIoU is min(s, 1/s): the loss is (1 - min(s, 1/s)) / 2, not invariant.
    centre = t.mean(dim=0)
    expected = (1 - min(scale, 1 / scale)) / 2
    assert _loss(centre + scale * (t - centre), t) == pytest.approx(expected, abs=1e-5)
    assert expected > 0


# ----------------------------------------------------------------------------------------------------- padding
def _pad(x: torch.Tensor, size: int, positions: list[bool], junk: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread x's vertices (in order) over `size` slots; the other slots hold junk and are masked."""
    real = [i for i, keep in enumerate(positions) if keep][: len(x)]
    real += [i for i in range(size) if i not in real][: len(x) - len(real)]
    real.sort()
    mask = torch.zeros(size, dtype=torch.bool)
    mask[real] = True
    padded = torch.full((size, 2), junk, dtype=x.dtype)
    padded[mask] = x
    return padded, mask


def _gradient_is_stable(p, t) -> bool:
    def grad(points):
        x = points.double().requires_grad_()
        return torch.autograd.grad(mgiou(x[None], t.double()[None]).sum(), x)[0]

    nudge = 1e-6 * torch.linspace(-1, 1, p.numel(), dtype=torch.float64).view_as(p)
    return torch.allclose(grad(p), grad(p.double() + nudge), atol=1e-4, rtol=1e-3)


@given(convex_polygons(), convex_polygons(), st.lists(st.booleans(), min_size=12, max_size=12),
       st.sampled_from([0.0, 1e6, -3.5, math.nan, math.inf]))
def test_padded_vertices_change_nothing(p, t, positions, junk):
    # At a kink of the loss (projections that tie: a vertex of p on one of t, an extreme attained by two vertices)
    # any split of the gradient between the tied vertices is a valid subgradient, and float rounding picks one: the
    # property is about padding, so it is judged where the gradient is stable under a tiny move of p.
    assume(_gradient_is_stable(p, t))
    p32, t32 = p.float().requires_grad_(), t.float().requires_grad_()
    plain = mgiou(p32[None], t32[None])
    (plain_grad,) = torch.autograd.grad(plain.sum(), p32)

    pp, pm = _pad(p.float(), 12, positions, junk)
    tp, tm = _pad(t.float(), 12, positions[::-1], junk)
    pp.requires_grad_()
    padded = mgiou(pp[None], tp[None], pm[None], tm[None])
    (padded_grad,) = torch.autograd.grad(padded.sum(), pp)
    assert padded.item() == pytest.approx(plain.item(), abs=1e-6)
    torch.testing.assert_close(padded_grad[pm], plain_grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(padded_grad[~pm], torch.zeros_like(padded_grad[~pm]))


def test_empty_batch_gives_empty_losses_and_gradients():
    pred = torch.zeros(0, 8, 2, requires_grad=True)
    no_vertices = torch.zeros(0, 8, dtype=torch.bool)
    loss = mgiou(pred, torch.zeros(0, 8, 2), no_vertices, no_vertices)
    loss.sum().backward()
    assert loss.shape == (0,) and pred.grad.shape == pred.shape
    assert convexity_loss(pred).shape == (0,)


# ---------------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@given(p=hs.polygons(families=hs.DEGENERATE_FAMILIES, dtype=torch.float16), t=convex_polygons())
def test_low_precision_input_computes_in_float32_and_the_convexity_term_stays_finite(dtype, p, t):
    # The catalogue checks mgiou's finiteness on degenerate families; its compute dtype and MGIoU+'s convexity
    # term are mgiou's own (float16 magnitudes: representable in every dtype here).
    p, q = p.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    loss = mgiou(p[None], q[None])
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss.sum() + convexity_loss(p[None]).sum(), (p, q))
    assert all(bool(torch.isfinite(g).all()) for g in grads), grads


# ----------------------------------------------------------------------------------------------------- gradients
@given(convex_polygons(), st.lists(st.floats(0.05, 1.0), min_size=8, max_size=8))
def test_point_inside_target_is_the_documented_stationary_point(t, weights):
    # A convex combination of the target's vertices pulled toward their mean lies strictly inside the target.
    w = torch.tensor(weights[: len(t)], dtype=torch.float64)
    inside = 0.5 * (w / w.sum()) @ t + 0.5 * t.mean(dim=0)
    collapsed = inside.expand(6, 2).clone().float().requires_grad_()
    loss = mgiou(collapsed[None], t.float()[None])
    (grad,) = torch.autograd.grad(loss.sum(), collapsed)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    # Zero up to rounding: each axis adds +g*n through the upper end and -g*n through the lower end of one vertex.
    assert float(grad.abs().max()) <= 1e-6
    assert "stationary" in mgiou.__doc__.lower()

    # Outside the target the same collapsed prediction does receive a gradient: the point is the exception.
    outside = (t.float() + 3 * _diameter(t)).mean(dim=0).expand(6, 2).clone().requires_grad_()
    (grad_out,) = torch.autograd.grad(mgiou(outside[None], t.float()[None]).sum(), outside)
    assert float(grad_out.norm()) > 0


@pytest.mark.parametrize("seed", range(4))
def test_convexity_term_autograd_matches_finite_differences_in_float64(seed):
    p, _ = _jittered_pair(seed, 5)
    assert torch.autograd.gradcheck(lambda a: convexity_loss(a[None]), (p.requires_grad_(),))


@pytest.mark.cuda
def test_cuda_layout_matches_cpu():
    # The projection layout differs per device (see _support); values and gradients must not.
    pairs = hs.PolygonSample(5, 64, 7, 7).pairs()
    p, t = torch.stack([x for x, _ in pairs]).float(), torch.stack([y for _, y in pairs]).float()
    on_cpu, on_cuda = p.clone().requires_grad_(), p.cuda().requires_grad_()
    loss_cpu, loss_cuda = mgiou(on_cpu, t), mgiou(on_cuda, t.cuda())
    (loss_cpu.sum() + loss_cuda.sum()).backward()
    torch.testing.assert_close(loss_cuda.cpu(), loss_cpu)
    torch.testing.assert_close(on_cuda.grad.cpu(), on_cpu.grad)


# ---------------------------------------------------------------------------------------------------------- boxes
def _giou_1d(lo_a, hi_a, lo_b, hi_b):
    """Textbook GIoU of two intervals: I/U - (C - U)/C."""
    inter = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp(min=0)
    union = (hi_a - lo_a) + (hi_b - lo_b) - inter
    hull = torch.maximum(hi_a, hi_b) - torch.minimum(lo_a, lo_b)
    return inter / union - (hull - union) / hull


xyxy_boxes = st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.floats(0.1, 10), st.floats(0.1, 10)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


@given(st.lists(st.tuples(xyxy_boxes, xyxy_boxes), min_size=1, max_size=6))
def test_axis_aligned_boxes_average_the_x_and_y_giou(pairs):
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    expected = (1 - (_giou_1d(pred[:, 0], pred[:, 2], target[:, 0], target[:, 2])
                     + _giou_1d(pred[:, 1], pred[:, 3], target[:, 1], target[:, 3])) / 2) / 2
    torch.testing.assert_close(mgiou_boxes(pred, target), expected)
    torch.testing.assert_close(mgiou_boxes(pred, target), mgiou(box_corners(pred), box_corners(target)))


rotated_boxes = st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.floats(0.1, 10), st.floats(0.1, 10),
                          st.floats(-math.pi, math.pi)).map(list)


@given(st.lists(st.tuples(rotated_boxes, rotated_boxes), min_size=1, max_size=6), st.floats(-math.pi, math.pi))
def test_rotated_boxes_equal_mgiou_of_their_corners_and_are_rotation_invariant(pairs, turn):
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    loss = mgiou_boxes(pred, target, "xywhr")
    torch.testing.assert_close(loss, mgiou(box_corners(pred, "xywhr"), box_corners(target, "xywhr")))

    def rotate(b):  # the whole scene turned about the origin
        c, s = math.cos(turn), math.sin(turn)
        x, y = b[:, 0] * c - b[:, 1] * s, b[:, 0] * s + b[:, 1] * c
        return torch.stack((x, y, b[:, 2], b[:, 3], b[:, 4] + turn), dim=1)

    torch.testing.assert_close(mgiou_boxes(rotate(pred), rotate(target), "xywhr"), loss)


@given(st.lists(rotated_boxes, min_size=1, max_size=6))
def test_box_corners_follow_the_documented_convention(boxes):
    b = torch.tensor(boxes, dtype=torch.float64)
    corners = box_corners(b, "xywhr")
    xyxy = torch.cat((b[:, :2] - b[:, 2:4] / 2, b[:, :2] + b[:, 2:4] / 2), dim=1)
    unrotated = torch.cat((b[:, :4], torch.zeros_like(b[:, :1])), dim=1)
    torch.testing.assert_close(box_corners(unrotated, "xywhr"), box_corners(xyxy, "xyxy"))
    for c in corners:  # positive shoelace area: (x1, y1) -> (x2, y1) -> (x2, y2) -> (x1, y2)
        assert signed_area(c.numpy()) > 0
    ops = pytest.importorskip("ultralytics.utils.ops")
    torch.testing.assert_close(corners, ops.xywhr2xyxyxyxy(b)[:, [2, 1, 0, 3]])


# ------------------------------------------------------------------------------------------------------ convexity
def _dent(p: torch.Tensor, k: int, depth: float) -> torch.Tensor:
    """Move vertex k (of V >= 4) across the chord of its neighbours, toward the other vertices: one reflex vertex."""
    n, k = len(p), k % len(p)
    chord_mid = (p[k - 1] + p[(k + 1) % n]) / 2
    others = torch.stack([p[i] for i in range(n) if i not in {(k - 1) % n, k, (k + 1) % n}]).mean(dim=0)
    dented = p.clone()
    dented[k] = chord_mid + depth * (others - chord_mid)  # strictly inside the polygon of the other vertices
    return dented


@given(convex_polygons(min_vertices=4), st.integers(0, 7), st.floats(0.2, 0.8), st.integers(0, 7),
       st.floats(-3, 3), st.floats(0, 2 * math.pi))
def test_convexity_term_is_zero_iff_convex_and_scale_invariant(p, k, depth, shift, log10_scale, angle):
    convex_variants = [p, p.flip(0), torch.roll(p, shift, 0), torch.cat((p, p[-1:]))]
    assert float(convexity_loss(torch.stack(convex_variants[:3]).float()).abs().max()) == 0.0
    assert float(convexity_loss(convex_variants[3].float()[None])) == 0.0

    dented = _dent(p, k, depth)
    penalty = float(convexity_loss(dented.float()[None]))
    assert 0 < penalty <= 1
    scale = 10.0 ** log10_scale
    moved = hs.similarity(dented, scale, angle, [7.0 * scale, -3.0 * scale])
    for variant in (moved, dented.flip(0), torch.roll(dented, shift, 0), torch.cat((dented[:2], dented[1:]))):
        assert float(convexity_loss(variant.float()[None])) == pytest.approx(penalty, abs=1e-5)


@given(convex_polygons(min_vertices=4), st.integers(0, 7), st.lists(st.booleans(), min_size=10, max_size=10))
def test_convexity_term_ignores_padded_vertices(p, k, positions):
    dented = _dent(p, k, 0.5).float()
    padded, mask = _pad(dented, 10, positions, math.nan)
    torch.testing.assert_close(convexity_loss(padded[None], mask[None]), convexity_loss(dented[None]))


# ------------------------------------------------------------------------------------------------- dtypes, errors
@pytest.mark.parametrize(("dtype", "out"), [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)], ids=str)
def test_result_dtype_is_the_documented_compute_dtype(dtype, out):
    square = box_corners(torch.tensor([[0.0, 0.0, 2.0, 1.0]])).to(dtype)
    assert mgiou(square, square + 0.5).dtype == out
    assert convexity_loss(square).dtype == out
    assert box_corners(torch.tensor([[0.0, 0.0, 2.0, 1.0]], dtype=dtype)).dtype == out


_SQ = box_corners(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: mgiou(_SQ[0], _SQ[0]), r"pred has shape \(4, 2\); expected \(N, V, 2\)"),
    (lambda: mgiou(_SQ, torch.zeros(1, 4, 3)), r"target has shape \(1, 4, 3\); expected \(N, V, 2\)"),
    (lambda: mgiou(_SQ, _SQ.repeat(2, 1, 1)), "pred has 1 shapes and target 2; expected the same number"),
    (lambda: mgiou(_SQ, _SQ.to("meta")), r"target is on meta; expected cpu, the device of pred"),
    (lambda: mgiou(_SQ, _SQ, torch.ones(1, 4, dtype=torch.bool, device="meta")),
     "pred_mask is on meta; expected cpu"),
    (lambda: mgiou(_SQ.long(), _SQ), "pred has dtype torch.int64; expected a floating-point tensor"),
    (lambda: mgiou(_SQ, _SQ, torch.ones(1, 4)), "pred_mask is torch.float32; expected a bool tensor"),
    (lambda: mgiou(_SQ, _SQ, None, torch.ones(1, 3, dtype=torch.bool)), r"target_mask has shape \(1, 3\); expected \(1, 4\)"),
    (lambda: mgiou(_SQ, _SQ, torch.zeros(1, 4, dtype=torch.bool)), "pred_mask has no real vertex in rows"),
    (lambda: mgiou(_SQ * math.nan, _SQ), "pred has 4 real vertex"),
    (lambda: mgiou(_SQ, _SQ.index_fill(1, torch.tensor([2]), math.inf)), "target has 1 real vertex"),
    (lambda: convexity_loss(_SQ, torch.zeros(1, 4, dtype=torch.bool)), "mask has no real vertex in rows"),
    (lambda: box_corners(torch.zeros(2, 4), "cxcywh"), "fmt is 'cxcywh'; expected one of"),
    (lambda: box_corners(torch.zeros(2, 4), "xywhr"), r"boxes has shape \(2, 4\); expected \(\.\.\., 5\)"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(LossInputError, match=match):
        call()
