"""Deliberately broken MGIoU losses, each failing one axiom of the shape-loss catalogue (headguard.checks.shape_loss).

The first eight are the bugs the team behind the Polygon head shipped in their six MGIoU variants (issue 11):
degenerate axes averaged in, independent normalisation of the two polygons, saturation at a perfect match, state kept
between calls, weights mixed across pairs, missing epsilons, fp16 epsilons that underflow, NaN cleaned after a
division. The others break the remaining axioms one at a time. Each is importable as a TARGET from tests/
(`headguard check shape_mutants:mgiou_open_polygon`); `CASES` maps every shape-loss check to the mutant it must fail
on and a fragment of its message (tests/meta/test_shape_loss_checks.py).
"""

from __future__ import annotations

import torch

from headguard.shapes import DEFAULT_CLAIMS, ShapeLossSpec
from losses.mgiou import _dot, _edges, _mgiou_similarity, _normalise, _prepare, _support, mgiou
from mutants import mgiou_nan_times_zero, mgiou_tiny_eps


# ----------------------------------------------------------------------------------------------------- parts
def _normalised(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as mgiou sees it: float32 or wider, centred and scaled jointly."""
    p, t = _normalise(_prepare(pred, None), _prepare(target, None))
    return p, t


def _normals(*shapes: torch.Tensor) -> torch.Tensor:
    """The (unnormalised) edge normals of every edge of the shapes, zero-length edges included."""
    edges = torch.cat([_edges(s) for s in shapes], dim=1)
    return torch.stack((-edges[..., 1], edges[..., 0]), dim=-1)


def _intervals(p: torch.Tensor, t: torch.Tensor, axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(overlap, hull) of the two shapes' projections on each axis, (N, A)."""
    p_lo, p_hi = _support(p, axes)
    t_lo, t_hi = _support(t, axes)
    return torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo), torch.maximum(p_hi, t_hi) - torch.minimum(p_lo, t_lo)


def _guarded(overlap: torch.Tensor, hull: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D GIoU overlap / hull where hull > 0 (0 elsewhere, selected before dividing), and that mask."""
    valid = hull > 0
    return torch.where(valid, overlap / torch.where(valid, hull, torch.ones_like(hull)), torch.zeros_like(hull)), valid


def _mean_giou_loss(p: torch.Tensor, t: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    giou, valid = _guarded(*_intervals(p, t, axes))
    return (1 - giou.sum(1) / valid.sum(1).clamp(min=1)) / 2


# ------------------------------------------------------------------------------------------- the team's bugs
def mgiou_degenerate_axes_averaged(pred, target, pred_mask=None, target_mask=None):
    """Every edge normal is an axis, zero-length ones too: their GIoU (0, by a guarded division) is averaged in, so
    a repeated vertex lowers the similarity."""
    p, t = _normalised(pred, target)
    giou, _ = _guarded(*_intervals(p, t, _normals(p, t)))
    return (1 - giou.mean(1)) / 2


def mgiou_normalised_independently(pred, target, pred_mask=None, target_mask=None):
    """Each polygon centred and scaled by its own extent: the pair's relative position and size are lost."""
    (p,), (t,) = _normalise(_prepare(pred, None)), _normalise(_prepare(target, None))
    return (1 - _mgiou_similarity(p, t)) / 2


def mgiou_saturated(pred, target, pred_mask=None, target_mask=None):
    """The loss floored at 0.01 "to keep gradients alive": it saturates near a perfect match and is never 0."""
    return mgiou(pred, target, pred_mask, target_mask).clamp(min=0.01)


_RUNNING = {"mean": None}


def mgiou_running_mean(pred, target, pred_mask=None, target_mask=None):
    """Adaptive weighting: the loss scaled by its batch mean over a running mean kept between calls."""
    loss = mgiou(pred, target, pred_mask, target_mask)
    batch = float(loss.detach().mean())
    previous = _RUNNING["mean"]
    _RUNNING["mean"] = batch if previous is None else 0.9 * previous + 0.1 * batch
    return loss * (batch / max(_RUNNING["mean"], 1e-6))


def mgiou_batch_weighted_axes(pred, target, pred_mask=None, target_mask=None):
    """Axes weighted by their hull length, the weights normalised over the whole batch instead of per pair."""
    p, t = _normalised(pred, target)
    normals = _normals(p, t)
    axes = normals / _dot(normals, normals).sqrt().clamp(min=1e-12)[..., None]
    giou, valid = _guarded(*_intervals(p, t, axes))
    weights = torch.where(valid, _intervals(p, t, axes)[1], torch.zeros_like(giou))
    return (1 - len(p) * (weights * giou).sum(1) / weights.sum().clamp(min=1e-12)) / 2


# Missing epsilons: no epsilon, degenerate axes "masked" by multiplying NaN by 0 (tests/mutants.py, R6).
mgiou_without_epsilon = mgiou_nan_times_zero
# fp16 epsilons that underflow: 1e-9 in the input dtype, which is 0 in float16 (tests/mutants.py, R6).
mgiou_fp16_epsilon = mgiou_tiny_eps


def mgiou_nan_cleaned_after_division(pred, target, pred_mask=None, target_mask=None):
    """0 / 0 on degenerate axes replaced by 0 after the division (R7): a finite loss whose backward still meets
    0 * inf."""
    p, t = _normalised(pred, target)
    overlap, hull = _intervals(p, t, _normals(p, t))
    giou = overlap / hull
    finite = torch.isfinite(giou)
    giou = torch.where(finite, giou, torch.zeros_like(giou))
    return (1 - giou.sum(1) / finite.sum(1).clamp(min=1)) / 2


# ------------------------------------------------------------------------------------- one axiom at a time
def mgiou_unhalved(pred, target, pred_mask=None, target_mask=None):
    """1 - MGIoU without the / 2: values in [0, 2]."""
    return 2 * mgiou(pred, target, pred_mask, target_mask)


def mgiou_target_axes_only(pred, target, pred_mask=None, target_mask=None):
    """Only the target's edge normals are axes: loss(p, t) != loss(t, p)."""
    p, t = _normalised(pred, target)
    return _mean_giou_loss(p, t, _normals(t))


def mgiou_vertex_axes(pred, target, pred_mask=None, target_mask=None):
    """The vertices themselves used as axes (the edge differences forgotten), on raw coordinates: the axes move with
    the pair, so the loss depends on where the pair is."""
    p, t = _prepare(pred, None), _prepare(target, None)
    return _mean_giou_loss(p, t, torch.cat((p, t), dim=1))


def mgiou_absolute_epsilon(pred, target, pred_mask=None, target_mask=None):
    """No normalisation, and 1e-6 (in coordinate units squared) added to every hull: small pairs lose."""
    p, t = _prepare(pred, None), _prepare(target, None)
    overlap, hull = _intervals(p, t, _normals(p, t))
    return (1 - (overlap / (hull + 1e-6)).mean(1)) / 2


def mgiou_axis_aligned(pred, target, pred_mask=None, target_mask=None):
    """Only the x and y axes (the GIoU of the bounding boxes): turning the pair changes the loss."""
    p, t = _normalised(pred, target)
    return _mean_giou_loss(p, t, torch.eye(2, dtype=p.dtype).expand(len(p), 2, 2))


def mgiou_open_polygon(pred, target, pred_mask=None, target_mask=None):
    """The closing edge (last vertex to first) left out: which edge is missing depends on the start vertex."""
    p, t = _normalised(pred, target)
    edges = torch.cat((p[:, 1:] - p[:, :-1], t[:, 1:] - t[:, :-1]), dim=1)
    return _mean_giou_loss(p, t, torch.stack((-edges[..., 1], edges[..., 0]), dim=-1))


def mgiou_plus_assumes_counter_clockwise(pred, target, pred_mask=None, target_mask=None):
    """MGIoU+ whose convexity term counts every clockwise turn of the prediction as reflex: a clockwise convex
    prediction is penalised as if it were maximally non-convex."""
    p, _ = _normalised(pred, target)
    edges = _edges(p)
    following = edges.roll(-1, dims=1)
    cross = edges[..., 0] * following[..., 1] - edges[..., 1] * following[..., 0]
    penalty = torch.relu(-cross).sum(1) / cross.abs().sum(1).clamp(min=1e-12)
    return (mgiou(pred, target, pred_mask, target_mask) + penalty) / 2


def mgiou_detached_prediction(pred, target, pred_mask=None, target_mask=None):
    """The prediction detached along with the normalising statistics: no gradient ever reaches it."""
    return mgiou(pred.detach(), target, pred_mask, target_mask)


class _DoubledBackward(torch.autograd.Function):
    """mgiou with a hand-written backward that forgets the 1/2 of (1 - MGIoU) / 2."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        return mgiou(pred, target)

    @staticmethod
    def backward(ctx, grad_output):
        pred, target = ctx.saved_tensors
        with torch.enable_grad():
            leaf = pred.detach().requires_grad_()
            (grad,) = torch.autograd.grad(mgiou(leaf, target), leaf, grad_output)
        return 2 * grad, None


def mgiou_wrong_backward(pred, target, pred_mask=None, target_mask=None):
    """mgiou through a hand-written backward that is twice the true gradient."""
    return _DoubledBackward.apply(pred, target)


def mgiou_divided_by_batch_size(pred, target, pred_mask=None, target_mask=None):
    """A mean taken twice: each pair's loss divided by the batch size, so the caller's mean shrinks with N."""
    return mgiou(pred, target, pred_mask, target_mask) / len(pred)


def _max_axis_similarity(pred, target, pred_mask=None, target_mask=None):
    p, t = _normalised(pred, target)
    normals = _normals(p, t)
    giou, valid = _guarded(*_intervals(p, t, normals))
    return (1 - torch.where(valid, giou, torch.full_like(giou, -1.0)).amax(1)) / 2


MAX_AXIS_CLAIMING_IOU = ShapeLossSpec(
    _max_axis_similarity, claims=DEFAULT_CLAIMS | {"approximates_iou"}, name="shape_mutants:MAX_AXIS_CLAIMING_IOU")
"""The best axis's GIoU instead of the mean over axes, claiming to approximate IoU: one well-aligned axis says little
about the overlap of the shapes."""


# check name -> (mutant, fragment of the message the check must give on it)
CASES = {
    "check_shape_loss_zero_at_match": (mgiou_saturated, "zero at a match: loss(p, p) = 0.01"),
    "check_shape_loss_bounded": (mgiou_unhalved, "bounded in [0, 1]"),
    "check_shape_loss_symmetric": (mgiou_target_axes_only, "symmetry: loss(pred, target)"),
    "check_shape_loss_translation_invariant": (mgiou_vertex_axes, "invariance to joint translation"),
    "check_shape_loss_scale_invariant": (mgiou_absolute_epsilon, "invariance to joint scaling"),
    "check_shape_loss_rotation_invariant": (mgiou_axis_aligned, "invariance to joint rotation"),
    "check_shape_loss_grows_with_relative_translation": (mgiou_normalised_independently,
                                                          "sensitivity to relative translation"),
    "check_shape_loss_grows_with_relative_scale": (mgiou_normalised_independently, "sensitivity to relative scale"),
    "check_shape_loss_cyclic_shift_invariant": (mgiou_open_polygon, "invariance to a cyclic shift"),
    "check_shape_loss_orientation_invariant": (mgiou_plus_assumes_counter_clockwise, "invariance to orientation"),
    "check_shape_loss_repeated_vertex_invariant": (mgiou_degenerate_axes_averaged, "invariance to repeated vertices"),
    "check_shape_loss_finite_on_degenerate": (mgiou_without_epsilon, "finite on degenerate input"),
    "check_shape_loss_gradients_finite_on_degenerate": (mgiou_nan_cleaned_after_division,
                                                         "non-finite value(s)"),
    "check_shape_loss_gradient_nonzero_away_from_match": (mgiou_detached_prediction, "no gradient at all"),
    "check_shape_loss_gradcheck": (mgiou_wrong_backward, "autograd against finite differences"),
    "check_shape_loss_pure": (mgiou_running_mean, "purity: the same pair gave loss"),
    "check_shape_loss_reduction": (mgiou_divided_by_batch_size, "reduction: alone the pair's loss is"),
    "check_shape_loss_batch_decomposition": (mgiou_batch_weighted_axes, "batch decomposition: pair"),
    "check_shape_loss_ranks_like_iou": (MAX_AXIS_CLAIMING_IOU, "approximates IoU"),
}
# Further (check, mutant, fragment) findings: the fp16 epsilon that is only a bug in float16.
EXTRA_CASES = [
    ("check_shape_loss_finite_on_degenerate", mgiou_fp16_epsilon, "in float16 the loss is nan"),
]
