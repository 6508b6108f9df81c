"""The polygon loss's vertex term, one definition for the reference path and the fast path.

Per positive anchor, from its predicted and target vertices (P, V, 2) in stride units, the real-vertex mask (P, V)
and the matched box's area (P,):

- "l2": mean over real vertices of |pred - target|^2 / (area + AREA_EPS) (OKS-like; padded vertices excluded);
- "shape": a shape loss `vertex_loss(pred, target, pred_mask=None, target_mask=None) -> (P,)`, the signature of
  `losses.mgiou` (the default), called with the target's mask;
- "hybrid": (1 - progress) * l2 + progress * shape loss, a pure function of its arguments: no running state.

`mode` is the shorthand: "l2", "mgiou" (the shape term with `losses.mgiou`) or "hybrid" (with `vertex_loss`, MGIoU by
default). `vertex_loss=fn` alone makes fn the whole term. The l2 term needs the box area, which a shape loss never
sees, so it is built in and is not a `vertex_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .mgiou import _mgiou_loss, mgiou

__all__ = ["AREA_EPS", "MODES", "TERMS", "resolve_vertex_term", "vertex_term"]

MODES = ("l2", "mgiou", "hybrid")
TERMS = ("l2", "shape", "hybrid")
AREA_EPS = 1e-9  # stride units^2, computed in float32 at least, where it is representable (R6)

ShapeLoss = Callable[..., torch.Tensor]


def resolve_vertex_term(mode: str | None, vertex_loss: ShapeLoss | None) -> tuple[str, ShapeLoss | None]:
    """(term in TERMS, shape loss or None) from `PolygonLoss`'s `mode` and `vertex_loss`; misuse raises.

    Neither given: "l2" (the reference default). A shape loss is needed by "shape" and "hybrid" (MGIoU by default).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES} or None")
    if vertex_loss is not None and not callable(vertex_loss):
        raise TypeError(
            f"vertex_loss is {vertex_loss!r} (type {type(vertex_loss).__name__}); expected a callable fn(pred (N, V, 2), "
            "target (N, V, 2), pred_mask=None, target_mask=None) -> (N,) like losses.mgiou"
        )
    if mode == "l2" and vertex_loss is not None:
        raise ValueError(
            f"vertex_loss is {vertex_loss!r} with mode='l2', which uses no shape loss; expected vertex_loss alone (the "
            "whole vertex term) or with mode='hybrid' (blended from l2 to it by progress)"
        )
    if mode == "mgiou" and vertex_loss is not None and vertex_loss is not mgiou:
        raise ValueError(
            f"vertex_loss is {vertex_loss!r} with mode='mgiou', which selects losses.mgiou; expected vertex_loss "
            "alone, or with mode='hybrid' to blend it with l2"
        )
    shape_loss = mgiou if vertex_loss is None else vertex_loss
    if mode == "hybrid":
        return "hybrid", shape_loss
    if mode == "mgiou" or vertex_loss is not None:
        return "shape", shape_loss
    return "l2", None


def unchecked(shape_loss: ShapeLoss | None) -> ShapeLoss | None:
    """The shape loss the losses call: `losses.mgiou` without its input checks (the loss checked its inputs, and
    MGIoU's checks read a flag on the host), any other callable as it is."""
    return _mgiou_loss if shape_loss is mgiou else shape_loss


def l2_vertex_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    # Select before subtracting: a padded target vertex may hold anything, and NaN * 0 would poison the gradient (R7).
    target = torch.where(mask[..., None], target, torch.zeros_like(target))
    squared = torch.where(mask, (pred - target).pow(2).sum(-1), torch.zeros_like(mask, dtype=pred.dtype))
    mean = squared.sum(-1) / mask.sum(-1).to(pred.dtype)
    return mean / (area + AREA_EPS)


def vertex_term(pred, target, mask, area, term: str, progress, shape_loss: ShapeLoss | None,
                shape_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-polygon vertex loss (P,) in float32 at least; `progress` a float or a 0-d tensor (a graph input).

    `shape_mask` is what the shape loss gets as `target_mask`: `mask`, or None where every vertex is real (the fast
    path's cheaper, equal MGIoU). `area` is only read by "l2" and "hybrid".
    """
    if term not in TERMS:
        raise ValueError(f"term is {term!r}; expected one of {TERMS}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target, area = pred.to(dtype), target.to(dtype), area.to(dtype)
    if term == "l2":
        return l2_vertex_loss(pred, target, mask, area)
    shape = _shape_term(shape_loss, pred, target, shape_mask)
    if term == "shape":
        return shape
    return (1.0 - progress) * l2_vertex_loss(pred, target, mask, area) + progress * shape


def _shape_term(shape_loss: ShapeLoss, pred, target, target_mask) -> torch.Tensor:
    """The shape loss of each pair, with its output checked: one floating loss per polygon."""
    out = shape_loss(pred, target, pred_mask=None, target_mask=target_mask)
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape == pred.shape[:1]):
        found = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"vertex_loss {shape_loss!r} returned {found}; expected a floating tensor of shape ({pred.shape[0]},), "
            "one loss per polygon (the signature of losses.mgiou)"
        )
    return out
