"""Pure-torch specifications of the fused kernels: the fallback, and the definition the kernels are tested against.

Each function computes what its kernel in `losses._kernels._triton` computes, in the same operation order, from the
same inputs, so that the kernel can be checked against it on the GPU and the spec against the reference on the CPU
(`tests/test_kernels.py`):

- `assign_metrics`: the assigner's candidate mask, CIoU overlaps and alignment metric over the dense (B, n, A) pairs
  (`losses.assigner._anchors_in_boxes` followed by the dense `_metrics`); equal to the reference bit for bit.
- `expectation_forward` / `expectation_backward`: the DFL softmax expectation over bins and its analytic gradient
  (`heads._decode.dfl_expectation`).
- `positive_dfl_forward` / `positive_dfl_backward_add`: the DFL cross-entropy at positive anchors (`losses._boxes
  .dfl_loss` of the gathered logits) and its gradient, added into the dense logits gradient in place.

Layouts: logits are the head's own (B, 4, R, A) view; positives are (image, anchor) index pairs (K,) with targets
(K, 4) in bins. Index pairs may repeat only where the repeats carry a zero upstream gradient (the fast path's filler
entries), because their gradients are added.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "assign_metrics",
    "expectation_backward",
    "expectation_forward",
    "positive_dfl_backward_add",
    "positive_dfl_forward",
]

BOX_EPS = 1e-7  # bbox_ciou's eps: heights, union, diagonal, alpha's denominator
INSIDE_EPS = 1e-9  # the in-box margin of the candidate test
ASPECT_GAIN = 4 / math.pi**2


def assign_metrics(
    pd_scores: torch.Tensor,
    pd_bboxes: torch.Tensor,
    anchor_points: torch.Tensor,
    labels: torch.Tensor,
    gt_bboxes: torch.Tensor,
    mask_gt: torch.Tensor,
    min_side: float,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate bool, overlaps, align), each (B, n, A); overlaps and align are exactly 0 off the candidates.

    pd_scores (B, A, nc) probabilities; pd_bboxes (B, A, 4) xyxy px; anchor_points (A, 2) px; labels (B, n) long;
    gt_bboxes (B, n, 4) xyxy px; mask_gt (B, n) bool. A candidate is a real gt whose box, with sides below `min_side`
    enlarged to it about the centre, holds the anchor strictly inside. overlaps = CIoU(gt, pred) clamped at 0;
    align = score[label] ** alpha * overlaps ** beta.
    Per-gt and per-anchor terms are computed once (as the kernel does) and broadcast over the pairs.
    """
    gt = gt_bboxes.unsqueeze(2)  # (B, n, 1, 4)
    pd = pd_bboxes.unsqueeze(1)  # (B, 1, A, 4)
    real = mask_gt.unsqueeze(-1)  # (B, n, 1)
    gx1, gy1, gx2, gy2 = gt.unbind(-1)
    px1, py1, px2, py2 = pd.unbind(-1)

    # Candidate test, on the enlarged box (xyxy -> centre/size -> enlarged -> xyxy, as the reference rounds).
    cx, cy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
    w, h = gx2 - gx1, gy2 - gy1
    w = torch.where((w < min_side) & real, torch.full_like(w, min_side), w)
    h = torch.where((h < min_side) & real, torch.full_like(h, min_side), h)
    half_w, half_h = w / 2, h / 2
    x, y = anchor_points[:, 0], anchor_points[:, 1]
    inside = (
        (x - (cx - half_w) > INSIDE_EPS) & (y - (cy - half_h) > INSIDE_EPS)
        & ((cx + half_w) - x > INSIDE_EPS) & ((cy + half_h) - y > INSIDE_EPS)
    )
    candidate = inside & real

    # CIoU(gt, pred), clamped at 0.
    aw, ah = gx2 - gx1, gy2 - gy1 + BOX_EPS
    bw, bh = px2 - px1, py2 - py1 + BOX_EPS
    inter = (torch.minimum(gx2, px2) - torch.maximum(gx1, px1)).clamp(0) * (
        torch.minimum(gy2, py2) - torch.maximum(gy1, py1)
    ).clamp(0)
    union = aw * ah + bw * bh - inter + BOX_EPS
    iou = inter / union
    cw = torch.maximum(gx2, px2) - torch.minimum(gx1, px1)
    ch = torch.maximum(gy2, py2) - torch.minimum(gy1, py1)
    diag2 = cw.pow(2) + ch.pow(2) + BOX_EPS
    centre2 = ((px1 + px2 - gx1 - gx2).pow(2) + (py1 + py2 - gy1 - gy2).pow(2)) / 4
    v = ASPECT_GAIN * ((bw / bh).atan() - (aw / ah).atan()).pow(2)
    shape_weight = v / (1 - iou + v + BOX_EPS)
    ciou = (iou - (centre2 / diag2 + v * shape_weight)).clamp(0)

    zero = torch.zeros((), dtype=ciou.dtype, device=ciou.device)
    overlaps = torch.where(candidate, ciou, zero)
    b, n = labels.shape
    score = pd_scores.transpose(1, 2).gather(1, labels.unsqueeze(-1).expand(b, n, pd_scores.shape[1]))
    align = torch.where(candidate, score.pow(alpha) * overlaps.pow(beta), zero)
    return candidate, overlaps, align


def _bins(reg_max: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(reg_max, dtype=like.dtype, device=like.device).view(reg_max, 1)


def _softmax_over_bins(logits: torch.Tensor) -> torch.Tensor:
    """softmax over dim 2 of (B, 4, R, A), max-subtracted."""
    shifted = logits - logits.amax(2, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(2, keepdim=True)


def expectation_forward(logits: torch.Tensor) -> torch.Tensor:
    """(B, 4, R, A) bin logits -> (B, 4, A): E[bin] under the softmax over bins."""
    return (_softmax_over_bins(logits) * _bins(logits.shape[2], logits)).sum(2)


def expectation_backward(logits: torch.Tensor, expectation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d/dlogits of <grad, E>: p_i * (bin_i - E) * grad, (B, 4, R, A); the softmax is recomputed, not saved."""
    probs = _softmax_over_bins(logits)
    return (_bins(logits.shape[2], logits) - expectation.unsqueeze(2)) * probs * grad.unsqueeze(2)


def _positive_logits(logits: torch.Tensor, image: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """(B, 4, R, A) -> (K, 4, R) at the positives."""
    return logits[image, :, :, anchor]


def _split_target(target: torch.Tensor, reg_max: int):
    """Target distance in bins -> (left bin, its weight, right weight), clamped so that the right bin exists."""
    target = target.clamp(0, reg_max - 1 - 0.01)
    left = target.long()
    w_left = (left + 1) - target
    return left, w_left, 1 - w_left


def positive_dfl_forward(
    logits: torch.Tensor, image: torch.Tensor, anchor: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """DFL cross-entropy (K,) at the positives, mean over the 4 sides; target (K, 4) distances in bins."""
    x = _positive_logits(logits, image, anchor)  # (K, 4, R)
    top = x.amax(-1, keepdim=True)
    lse = top + (x - top).exp().sum(-1, keepdim=True).log()
    left, w_left, w_right = _split_target(target, x.shape[-1])
    x_left = x.gather(-1, left.unsqueeze(-1))
    x_right = x.gather(-1, (left + 1).unsqueeze(-1))
    side = -((x_left - lse).squeeze(-1) * w_left + (x_right - lse).squeeze(-1) * w_right)
    return side.mean(-1)


def positive_dfl_backward_add(
    grad_logits: torch.Tensor,
    logits: torch.Tensor,
    image: torch.Tensor,
    anchor: torch.Tensor,
    target: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Add d/dlogits of <grad, positive_dfl_forward> into `grad_logits` (B, 4, R, A) in place and return it.

    Per positive and side: grad / 4 * (softmax - t), t the two-bin interpolated target.
    """
    x = _positive_logits(logits, image, anchor)
    reg_max = x.shape[-1]
    probs = (x - x.amax(-1, keepdim=True)).exp()
    probs = probs / probs.sum(-1, keepdim=True)
    left, w_left, w_right = _split_target(target, reg_max)
    bins = torch.arange(reg_max, device=x.device)
    t = torch.where(bins == left.unsqueeze(-1), w_left.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device))
    t = torch.where(bins == (left + 1).unsqueeze(-1), w_right.unsqueeze(-1), t)
    local = (probs - t) * (grad / 4)[:, None, None]
    side = torch.arange(4, device=x.device)
    flat = ((image[:, None, None] * 4 + side[:, None]) * reg_max + bins) * logits.shape[3] + anchor[:, None, None]
    grad_logits.view(-1).index_add_(0, flat.reshape(-1), local.reshape(-1))
    return grad_logits
