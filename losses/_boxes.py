"""Box formats, CIoU and the DFL loss: pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from heads._decode import dist2bbox

__all__ = ["bbox2dist", "bbox_ciou", "dfl_loss", "dist2bbox", "xywh2xyxy", "xyxy2xywh"]


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre-size boxes -> corner boxes; returns a new tensor."""
    centre, half = x[..., :2], x[..., 2:] / 2
    return torch.cat((centre - half, centre + half), -1)


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> centre-size boxes; returns a new tensor."""
    top_left, bottom_right = x[..., :2], x[..., 2:]
    return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), -1)


def bbox2dist(anchor_points: torch.Tensor, bbox: torch.Tensor, reg_max: float | None = None) -> torch.Tensor:
    """xyxy boxes -> (left, top, right, bottom) distances from anchor points; inverse of dist2bbox(xywh=False).

    With `reg_max`, distances are clamped to [0, reg_max - 0.01] so the DFL's right bin stays in range; the clamp is
    part of the DFL target definition (a box reaching past the last bin is trained towards the last bin).
    """
    top_left, bottom_right = bbox.chunk(2, -1)
    dist = torch.cat((anchor_points - top_left, bottom_right - anchor_points), -1)
    return dist if reg_max is None else dist.clamp(0, reg_max - 0.01)


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of xyxy boxes, broadcast over leading dims; returns (...,) without the last dim.

    CIoU = IoU - d^2/c^2 - alpha*v with d the centre distance, c the enclosing-box diagonal, v the aspect-ratio term
    (4/pi^2)(atan(w2/h2) - atan(w1/h1))^2 and alpha = v / (1 - IoU + v) treated as a constant (no gradient).
    Bounds: IoU in [0, 1], d^2/c^2 in [0, 1) and alpha*v in [0, 1) (v <= 1, alpha <= 1), so CIoU lies in (-2, 1];
    a tighter bound: when IoU = 0, d^2/c^2 < 1 and alpha*v = v^2/(1+v) <= 1/2, so CIoU > -1.5.
    `eps` is added to heights (degenerate boxes), the union, the diagonal and alpha's denominator.
    """
    ax1, ay1, ax2, ay2 = box1.unbind(-1)
    bx1, by1, bx2, by2 = box2.unbind(-1)
    aw, ah = ax2 - ax1, ay2 - ay1 + eps
    bw, bh = bx2 - bx1, by2 - by1 + eps
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    diag2 = cw.pow(2) + ch.pow(2) + eps
    centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    v = (4 / math.pi**2) * ((bw / bh).atan() - (aw / ah).atan()).pow(2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - (centre2 / diag2 + v * alpha)


def dfl_loss(pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: (N, 4, reg_max) bin logits, (N, 4) targets in bins -> (N,) mean over the 4 sides.

    The target t in [0, reg_max - 1) is split between bins floor(t) and floor(t)+1 by linear interpolation; targets
    are clamped to reg_max - 1.01 so the right bin exists (as in Ultralytics).
    """
    reg_max = pred_dist.shape[-1]
    target = target.clamp(0, reg_max - 1 - 0.01)
    left = target.long()
    w_left = (left + 1) - target
    logp = F.log_softmax(pred_dist, dim=-1)
    lp_left = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    lp_right = logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return -(lp_left * w_left + lp_right * (1 - w_left)).mean(-1)
