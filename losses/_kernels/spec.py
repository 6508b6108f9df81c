"""Pure-torch specifications of the fused kernels: the fallback, and the definition the kernels are tested against.

Each function computes what its kernel in `losses._kernels._triton` computes, in the same operation order, from the
same inputs, so that the kernel can be checked against it on the GPU and the spec against the reference on the CPU
(`tests/test_kernels.py`):

- `assign_metrics`: the assigner's candidate mask, CIoU overlaps and alignment metric over the dense (B, n, A) pairs
  (`losses.assigner._anchors_in_boxes` followed by the dense `_metrics`); equal to the reference bit for bit.
- `assign_positives`: the assigner's positives from those metrics (top-k per gt, conflicts resolved by overlap), as
  the per-anchor gt index and metric and the per-gt best metric and overlap (`Positives`). The kernels: a top-k
  kernel marks each row's picks (`top_indices`: ties to the lowest index; torch's top-k on long rows), a pass over
  the pairs does the rest (`positives_from_picks`).
- `expectation_forward` / `expectation_backward`: the DFL softmax expectation over bins and its analytic gradient
  (`heads._decode.dfl_expectation`).
- `positive_dfl_forward` / `positive_dfl_backward_add`: the DFL cross-entropy at positive anchors (`losses._boxes
  .dfl_loss` of the gathered logits) and its gradient, added into the dense logits gradient in place;
- `positive_boxes` / `positive_boxes_backward`: the fast path's box term at its positives, weight * (1 - CIoU) (the
  decode, the target and weight gathers, the DFL targets), with `ciou_gradient`, CIoU's gradient by hand under
  autograd's rules for `losses._boxes.bbox_ciou` (alpha a constant, halves at min/max ties), computed in the forward;
  the backward writes it, scaled, into the expectation's dense gradient. `ciou_parts` is the one CIoU of the specs
  (`assign_metrics` uses it too).
- `class_bce` / `class_bce_backward`: the classification term, BCE with logits against the one-hot soft targets,
  summed, from the per-anchor class and target score (the dense targets are never built), and its gradient.
- `mgiou_forward`: MGIoU (`losses.mgiou._mgiou_loss`: fill, normalise, axes, supports, 1-D GIoU mean) and, in the
  same pass, its hand-written gradient per pair, with autograd's rules at ties (first extreme vertex; halves at equal
  interval ends); a backward is then one multiply by the upstream gradient. `mgiou_problems`: the bits of
  `losses.mgiou.mgiou`'s value checks (non-finite real vertices, empty masks), found in one read of the vertices.

Layouts: logits are the head's own (B, 4, R, A) view; positives are (image, anchor) index pairs (K,) with targets
(K, 4) in bins. Index pairs may repeat only where the repeats carry a zero upstream gradient (the fast path's filler
entries), because their gradients are added.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "CIoUParts",
    "PositiveBoxes",
    "Positives",
    "alignment",
    "assign_metrics",
    "assign_positives",
    "ciou_gradient",
    "ciou_parts",
    "class_bce",
    "class_bce_backward",
    "class_targets",
    "expectation_backward",
    "expectation_forward",
    "mgiou_forward",
    "mgiou_problems",
    "real_finite",
    "positive_boxes",
    "positive_boxes_backward",
    "positives_from_picks",
    "positive_dfl_backward_add",
    "positive_dfl_forward",
    "resolve_conflicts",
    "summarise_positives",
    "top_candidates",
    "top_indices",
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
    ciou = ciou_parts(gt, pd).ciou.clamp(0)

    overlaps = torch.where(candidate, ciou, torch.zeros((), dtype=ciou.dtype, device=ciou.device))
    return candidate, overlaps, alignment(pd_scores, labels, candidate, overlaps, alpha, beta)


class CIoUParts(NamedTuple):
    """`losses._boxes.bbox_ciou(box1, box2)` and the intermediates its gradient needs (`ciou_parts`)."""

    ciou: torch.Tensor
    box1: tuple[torch.Tensor, ...]  # x1, y1, x2, y2
    box2: tuple[torch.Tensor, ...]
    w1: torch.Tensor
    h1: torch.Tensor  # with BOX_EPS, as every height
    inter_w: torch.Tensor  # the overlap's sides before the clamp at 0
    inter_h: torch.Tensor
    inter: torch.Tensor
    union: torch.Tensor
    cw: torch.Tensor  # the enclosing box's sides
    ch: torch.Tensor
    diag2: torch.Tensor
    centre2: torch.Tensor
    angle_gap: torch.Tensor  # atan(w2 / h2) - atan(w1 / h1)
    shape_weight: torch.Tensor  # CIoU's alpha (a constant to the gradient)


def ciou_parts(box1: torch.Tensor, box2: torch.Tensor) -> CIoUParts:
    """CIoU of xyxy boxes (..., 4), broadcast, in `bbox_ciou`'s operation order, with its intermediates."""
    ax1, ay1, ax2, ay2 = box1.unbind(-1)
    bx1, by1, bx2, by2 = box2.unbind(-1)
    aw, ah = ax2 - ax1, ay2 - ay1 + BOX_EPS
    bw, bh = bx2 - bx1, by2 - by1 + BOX_EPS
    inter_w = torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)
    inter_h = torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    inter = inter_w.clamp(0) * inter_h.clamp(0)
    union = aw * ah + bw * bh - inter + BOX_EPS
    iou = inter / union
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    diag2 = cw.pow(2) + ch.pow(2) + BOX_EPS
    centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    angle_gap = (bw / bh).atan() - (aw / ah).atan()
    v = ASPECT_GAIN * angle_gap.pow(2)
    shape_weight = v / (1 - iou + v + BOX_EPS)
    ciou = iou - (centre2 / diag2 + v * shape_weight)
    return CIoUParts(ciou, (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2), aw, ah, inter_w, inter_h, inter, union, cw, ch,
                     diag2, centre2, angle_gap, shape_weight)


def _tie_share(x: torch.Tensor, other: torch.Tensor, wins) -> torch.Tensor:
    """The share of torch.minimum's / maximum's gradient that goes to x: 1 where `wins(x, other)`, 1/2 at a tie."""
    return torch.where(x == other, 0.5, wins(x, other).to(x.dtype))


def ciou_gradient(p: CIoUParts) -> tuple[torch.Tensor, ...]:
    """d CIoU / d (x1, y1, x2, y2) of box1, with autograd's rules for `bbox_ciou`: alpha a constant, the clamp's
    gradient passing at 0, torch.minimum / maximum splitting it at ties."""
    ax1, ay1, ax2, ay2 = p.box1
    bx1, by1, bx2, by2 = p.box2
    iou_over_union = p.inter / p.union
    d_inter = 1 / p.union + iou_over_union / p.union  # through iou's numerator and the union
    d_area = -iou_over_union / p.union
    d_inter_w = d_inter * p.inter_h.clamp(0) * (p.inter_w >= 0).to(p.inter.dtype)
    d_inter_h = d_inter * p.inter_w.clamp(0) * (p.inter_h >= 0).to(p.inter.dtype)
    d_diag2 = p.centre2 / p.diag2.pow(2)
    d_cw, d_ch = d_diag2 * 2 * p.cw, d_diag2 * 2 * p.ch
    ratio = p.w1 / p.h1
    d_ratio = ASPECT_GAIN * 2 * p.angle_gap * p.shape_weight / (1 + ratio.pow(2))  # of -alpha * v through atan
    d_w = d_area * p.h1 + d_ratio / p.h1
    d_h = d_area * p.w1 - d_ratio * p.w1 / p.h1.pow(2)
    d_centre_x = (bx1 + bx2 - ax1 - ax2) / (2 * p.diag2)  # of -centre2 / diag2, per corner coordinate
    d_centre_y = (by1 + by2 - ay1 - ay2) / (2 * p.diag2)
    lt, gt = torch.lt, torch.gt
    dx1 = -d_inter_w * _tie_share(ax1, bx1, gt) - d_cw * _tie_share(ax1, bx1, lt) - d_w + d_centre_x
    dy1 = -d_inter_h * _tie_share(ay1, by1, gt) - d_ch * _tie_share(ay1, by1, lt) - d_h + d_centre_y
    dx2 = d_inter_w * _tie_share(ax2, bx2, lt) + d_cw * _tie_share(ax2, bx2, gt) + d_w + d_centre_x
    dy2 = d_inter_h * _tie_share(ay2, by2, lt) + d_ch * _tie_share(ay2, by2, gt) + d_h + d_centre_y
    return dx1, dy1, dx2, dy2


def alignment(pd_scores: torch.Tensor, labels: torch.Tensor, candidate: torch.Tensor, overlaps: torch.Tensor,
              alpha: float, beta: float) -> torch.Tensor:
    """align (B, n, A) = score[label] ** alpha * overlaps ** beta on the candidates, exactly 0 elsewhere (shapes as in
    `assign_metrics`)."""
    b, n = labels.shape
    score = pd_scores.transpose(1, 2).gather(1, labels.unsqueeze(-1).expand(b, n, pd_scores.shape[1]))
    zero = torch.zeros((), dtype=overlaps.dtype, device=overlaps.device)
    return torch.where(candidate, score.pow(alpha) * overlaps.pow(beta), zero)


class Positives(NamedTuple):
    """The assignment's positives, per anchor and per gt: fg (B, A) bool; gt_index (B, A) long, the anchor's gt (0 on
    background anchors); own_align (B, A), its metric for that gt; best_align, best_overlap (B, n), each gt's largest
    metric and overlap over its positives (0 without any)."""

    fg: torch.Tensor
    gt_index: torch.Tensor
    own_align: torch.Tensor
    best_align: torch.Tensor
    best_overlap: torch.Tensor


def top_candidates(align: torch.Tensor, mask_gt: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, n, A) bool: the topk anchors of each real gt (mask_gt (B, n, 1)); an anchor picked more than once in a row
    is dropped (Ultralytics' rule; only the padding rows, all pointed at anchor 0, have repeats)."""
    idx = align.topk(topk, dim=-1).indices
    idx = idx.masked_fill(~mask_gt, 0)
    count_dtype = torch.int8 if topk < 128 else torch.int32
    count = torch.zeros(align.shape, dtype=count_dtype, device=align.device)
    count.scatter_add_(-1, idx, torch.ones_like(idx, dtype=count_dtype))
    return count == 1


def top_indices(align: torch.Tensor, mask_gt: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, n, topk) the topk anchors of each real gt's row (mask_gt (B, n)) by metric, ties to the lowest anchor
    index; 0 for padding rows: the top-k kernel's definition. torch.topk picks the same values (its choice among exact
    ties is unspecified), so using either changes only which of equally scored anchors are picked; the positives take
    the picks as a set."""
    idx = align.sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    return idx.masked_fill(~mask_gt.unsqueeze(-1), 0)


def resolve_conflicts(mask_pos: torch.Tensor, overlaps: torch.Tensor) -> torch.Tensor:
    """An anchor positive for several gts keeps only the gt of highest overlap (the first, at a tie) over all gts."""
    multi = mask_pos.sum(1, keepdim=True) > 1  # (B, 1, A)
    best = torch.zeros_like(mask_pos).scatter_(1, overlaps.max(1).indices.unsqueeze(1), True)
    return torch.where(multi, best, mask_pos)


def summarise_positives(mask_pos: torch.Tensor, align: torch.Tensor, overlaps: torch.Tensor) -> Positives:
    """`Positives` of a (B, n, A) mask with at most one gt per anchor."""
    fg, gt_index = mask_pos.to(torch.int8).max(1)  # background anchors point at gt 0, as Ultralytics
    zero = torch.zeros((), dtype=align.dtype, device=align.device)
    best_align = torch.where(mask_pos, align, zero).amax(-1)
    best_overlap = torch.where(mask_pos, overlaps, zero).amax(-1)
    own_align = align.gather(1, gt_index.unsqueeze(1)).squeeze(1)
    return Positives(fg.bool(), gt_index, own_align, best_align, best_overlap)


def assign_positives(align: torch.Tensor, overlaps: torch.Tensor, candidate: torch.Tensor, mask_gt: torch.Tensor,
                     topk: int) -> Positives:
    """The positives of the task-aligned assignment from the dense (B, n, A) metrics (`assign_metrics`' outputs):
    each real gt's topk anchors by metric among its candidates, conflicts resolved by overlap."""
    return positives_from_picks(top_candidates(align, mask_gt, topk), candidate, overlaps, align)


def positives_from_picks(picked: torch.Tensor, candidate: torch.Tensor, overlaps: torch.Tensor,
                         align: torch.Tensor) -> Positives:
    """`Positives` of the top-k picks (B, n, A) (bool, or 0/1): those among the candidates, conflicts resolved."""
    return summarise_positives(resolve_conflicts(picked.bool() & candidate, overlaps), align, overlaps)


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


# ---------------------------------------------------------------------------------------------------------- box term
class PositiveBoxes(NamedTuple):
    """The box term's parts at the fast path's positives (K,): `loss` weight * (1 - CIoU(pred, target)); `weight`
    the target score (0 on filler entries); `dfl_target` (K, 4) the DFL's target distances in bins; `grad` (K, 4)
    d loss / d (left, top, right, bottom) predicted distances."""

    loss: torch.Tensor
    weight: torch.Tensor
    dfl_target: torch.Tensor
    grad: torch.Tensor


def positive_boxes(expectation: torch.Tensor, anchor_points: torch.Tensor, stride_tensor: torch.Tensor,
                   index: torch.Tensor, valid: torch.Tensor, target_bboxes: torch.Tensor, target_scores: torch.Tensor,
                   reg_max: int) -> PositiveBoxes:
    """`PositiveBoxes` of the positives at flat (B*A) `index` (K,), `valid` (K,) marking the real ones.

    expectation (B, 4, A) predicted distances in grid units; anchor_points (A, 2) and stride_tensor (A, 1) from
    make_anchors; target_bboxes (B, A, 4) xyxy pixels and target_scores (B, A, nc) from the assignment. A filler
    entry takes its own prediction as target (finite terms) and weight 0. The weight is a sum over one-hot scores,
    exact in any order.
    """
    a = expectation.shape[2]
    image, anchor = index // a, index % a
    point = anchor_points[anchor]
    left_top, right_bottom = expectation[image, :, anchor].chunk(2, -1)
    pred = torch.cat((point - left_top, point + right_bottom), -1)  # dist2bbox(xywh=False) at the positives
    target = target_bboxes[image, anchor] / stride_tensor[anchor]
    target = torch.where(valid[:, None], target, pred)
    zero = torch.zeros((), dtype=target_scores.dtype, device=target_scores.device)
    weight = torch.where(valid, target_scores[image, anchor].sum(-1), zero)
    dfl_target = torch.cat((point - target[:, :2], target[:, 2:] - point), -1).clamp(0, reg_max - 1 - 0.01)
    parts = ciou_parts(pred, target)
    dx1, dy1, dx2, dy2 = ciou_gradient(parts)
    # loss = weight * (1 - CIoU); x1 = point_x - left, x2 = point_x + right, and so on.
    grad = torch.stack((dx1, dy1, -dx2, -dy2), -1) * weight[:, None]
    return PositiveBoxes((1 - parts.ciou) * weight, weight, dfl_target, grad)


def positive_boxes_backward(grad: torch.Tensor, grad_loss: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                            shape: torch.Size) -> torch.Tensor:
    """The dense gradient (B, 4, A) of the expectation: `grad` (K, 4) times `grad_loss` (K,) at the valid positives
    (distinct), zero elsewhere."""
    b, _, a = shape
    image, anchor = index // a, index % a
    side = torch.arange(4, device=index.device)
    flat = (image[:, None] * 4 + side) * a + anchor[:, None]
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    local = torch.where(valid[:, None], grad * grad_loss[:, None], zero)
    out = torch.zeros(b * 4 * a, dtype=grad.dtype, device=grad.device)
    return out.index_add_(0, flat.reshape(-1), local.reshape(-1)).view(shape)


# ---------------------------------------------------------------------------------------------------------- class term
def class_targets(labels: torch.Tensor, score: torch.Tensor, nc: int) -> torch.Tensor:
    """The assignment's dense soft targets in the head's (B, nc, A) layout: `score` (B, A) at each anchor's class
    `labels` (B, A), 0 elsewhere (`losses.assigner.Assignment.target_scores`, transposed)."""
    classes = torch.arange(nc, device=labels.device)[None, :, None]
    zero = torch.zeros((), dtype=score.dtype, device=score.device)
    return torch.where(classes == labels[:, None, :], score[:, None, :], zero)


def class_bce(logits: torch.Tensor, labels: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The classification term's sum (0-d): BCE with logits of `logits` (B, nc, A) against `class_targets`, as
    (1 - t) * x - log_sigmoid(x) (torch's binary_cross_entropy_with_logits, reduction "sum")."""
    t = class_targets(labels, score.to(logits.dtype), logits.shape[1])
    return ((1 - t) * logits - torch.nn.functional.logsigmoid(logits)).sum()


def class_bce_backward(logits: torch.Tensor, labels: torch.Tensor, score: torch.Tensor,
                       grad: torch.Tensor) -> torch.Tensor:
    """d class_bce / d logits (B, nc, A) times the 0-d upstream `grad`: (sigmoid(x) - t) * grad."""
    t = class_targets(labels, score.to(logits.dtype), logits.shape[1])
    return (torch.sigmoid(logits) - t) * grad


# ---------------------------------------------------------------------------------------------------------- MGIoU
# losses.mgiou's thresholds (relative to a pair's extent; tests/test_mgiou_kernel.py ties them to that module's).
MGIOU_EDGE_EPS = 1e-6
MGIOU_SPREAD_EPS = 1e-6
# Bits of the problem flag `mgiou_problems` returns: the value checks of `losses.mgiou.mgiou`, found in one read of the
# vertices, so that the checks cost one read of a 0-d tensor.
MGIOU_PRED_NONFINITE = 1  # a real pred vertex has a non-finite coordinate
MGIOU_TARGET_NONFINITE = 2
MGIOU_PRED_EMPTY = 4  # a pred_mask row has no real vertex
MGIOU_TARGET_EMPTY = 8


def real_finite(vertices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-vertex flag (N, V): finite, or padded (a padded vertex is never read, whatever it holds)."""
    finite = torch.isfinite(vertices).all(dim=-1)
    return finite if mask is None else finite | ~mask


def mgiou_problems(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None,
                   target_mask: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """0-d int32: the MGIOU_* bits of the problems found in any pair (a row without a real vertex is only empty: its
    padded slots are never read, so their values are not a problem), or-ed into `out` where given."""
    no = torch.zeros((), dtype=torch.bool, device=pred.device)
    found = torch.stack((~real_finite(pred, pred_mask).all(), ~real_finite(target, target_mask).all(),
                         no if pred_mask is None else ~pred_mask.any(dim=1).all(),
                         no if target_mask is None else ~target_mask.any(dim=1).all()))
    bits = torch.tensor([MGIOU_PRED_NONFINITE, MGIOU_TARGET_NONFINITE, MGIOU_PRED_EMPTY, MGIOU_TARGET_EMPTY],
                        dtype=torch.int32, device=pred.device)
    found_bits = (found.to(torch.int32) * bits).sum(dtype=torch.int32)
    return found_bits if out is None else out.bitwise_or_(found_bits)


def mgiou_sources(mask: torch.Tensor | None, n: int, v: int, device) -> torch.Tensor:
    """(N, V) slot each vertex slot reads: itself if real, else the nearest real slot before it, cyclically (leading
    padded slots read the last real one); `losses.mgiou._fill_padded`'s rule. Without a mask every slot is real. A row
    without a real vertex (a problem `mgiou_problems` reports) reads slot 0, as the kernel does."""
    index = torch.arange(v, device=device).expand(n, v)
    if mask is None:
        return index
    last_real = torch.where(mask, index, -1).cummax(dim=1).values
    return torch.where(last_real >= 0, last_real, last_real[:, -1:]).clamp(min=0)


def _mgiou_filled(vertices: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, v, _ = vertices.shape
    source = mgiou_sources(mask, n, v, vertices.device)
    return torch.gather(vertices, 1, source.unsqueeze(-1).expand(-1, -1, 2)), source


def _mgiou_geometry(pred, target, pred_mask, target_mask):
    """Filled vertices centred on the pair's joint box and divided by its longer side; the scale (N, 1, 1)."""
    p, p_source = _mgiou_filled(pred, pred_mask)
    t, t_source = _mgiou_filled(target, target_mask)
    low = torch.minimum(p.amin(1, keepdim=True), t.amin(1, keepdim=True))
    high = torch.maximum(p.amax(1, keepdim=True), t.amax(1, keepdim=True))
    centre = (low + high) * 0.5
    extent = (high - low).amax(-1, keepdim=True)
    scale = torch.where(extent > 0, extent, torch.ones_like(extent))
    return (p - centre) / scale, (t - centre) / scale, scale, p_source, t_source


def _mgiou_normals(v: torch.Tensor) -> torch.Tensor:
    """Normal (-e_y, e_x) of edge i = v[i + 1] - v[i] (cyclic), (N, V, 2)."""
    edges = torch.roll(v, shifts=-1, dims=1) - v
    return torch.stack((-edges[..., 1], edges[..., 0]), dim=-1)


def _mgiou_support(v: torch.Tensor, axes: torch.Tensor):
    """Lowest and highest projection (N, M) of vertices (N, V, 2) on axes (N, M, 2) and the first vertex reaching each
    (x * a_x + y * a_y, the products rounded separately, as the kernel and `losses.mgiou._dot` round them)."""
    proj = v[:, None, :, 0] * axes[:, :, None, 0] + v[:, None, :, 1] * axes[:, :, None, 1]  # (N, M, V)
    lo, hi = proj.amin(-1), proj.amax(-1)
    slot = torch.arange(v.shape[1], device=v.device)
    beyond = torch.full((), v.shape[1], device=v.device)
    lo_at = torch.where(proj == lo[..., None], slot, beyond).amin(-1)
    hi_at = torch.where(proj == hi[..., None], slot, beyond).amin(-1)
    return lo, hi, lo_at, hi_at


def _mgiou_axes_terms(pred, target, pred_mask, target_mask):
    """Everything both passes need: geometry, axes (edge normals of pred, of target, then x and y), supports, the
    1-D overlap and hull per axis and which axes are valid."""
    p, t, scale, p_source, t_source = _mgiou_geometry(pred, target, pred_mask, target_mask)
    n = p.shape[0]
    normals = torch.cat((_mgiou_normals(p), _mgiou_normals(t)), dim=1)
    normal_sq = normals[..., 0] * normals[..., 0] + normals[..., 1] * normals[..., 1]
    fallback = torch.eye(2, dtype=p.dtype, device=p.device).expand(n, 2, 2)
    axes = torch.cat((normals, fallback), dim=1)
    axis_sq = torch.cat((normal_sq, torch.ones_like(normal_sq[:, :2])), dim=1)
    p_lo, p_hi, p_lo_at, p_hi_at = _mgiou_support(p, axes)
    t_lo, t_hi, t_lo_at, t_hi_at = _mgiou_support(t, axes)
    overlap = torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo)
    hull = (p_hi - p_lo) + (t_hi - t_lo) - overlap
    spread = hull * hull > (MGIOU_SPREAD_EPS * MGIOU_SPREAD_EPS) * axis_sq
    n_edges = normals.shape[1]
    edge_valid = (normal_sq > MGIOU_EDGE_EPS * MGIOU_EDGE_EPS) & spread[:, :n_edges]
    no_edge_axis = ~edge_valid.any(dim=1, keepdim=True)
    valid = torch.cat((edge_valid, spread[:, n_edges:] & no_edge_axis), dim=1)
    safe_hull = torch.where(valid, hull, torch.ones_like(hull))
    giou = torch.where(valid, overlap / safe_hull, torch.zeros_like(hull))
    return dict(p=p, t=t, scale=scale, p_source=p_source, t_source=t_source, axes=axes, p_lo=p_lo, p_hi=p_hi,
                t_lo=t_lo, t_hi=t_hi, p_lo_at=p_lo_at, p_hi_at=p_hi_at, t_lo_at=t_lo_at, t_hi_at=t_hi_at,
                valid=valid, safe_hull=safe_hull, giou=giou)


def mgiou_forward(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None,
                  target_mask: torch.Tensor | None, need_pred: bool = False, need_target: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """MGIoU loss (N,) of float32 vertices (N, Vp, 2), (N, Vt, 2) with optional (N, V) bool masks, as
    `losses.mgiou._mgiou_loss` computes it, and, where asked, the gradient of
    each pair's loss with respect to its pred and its target vertices (N, Vp, 2), (N, Vt, 2), 0 at padded slots (else
    None). A backward multiplies them by the upstream gradient of each pair: one pass computes everything.

    Operation order of the kernel: fill, normalise (centre = (low + high) * 0.5, divided by the longer side), edge
    normals, supports (separately rounded products), per axis the 1-D GIoU over the valid axes (pred's edges, then
    target's, then x and y where no edge axis is valid), summed axis after axis, divided by the count.
    """
    terms = _mgiou_axes_terms(pred, target, pred_mask, target_mask)
    giou = terms["giou"]
    total = torch.zeros_like(giou[:, 0])
    for m in range(giou.shape[1]):  # one axis after the other, as the kernel sums
        total = total + giou[:, m]
    count = terms["valid"].sum(dim=1)
    mean = total / count.clamp(min=1).to(total.dtype)
    similarity = torch.where(count > 0, mean, torch.ones_like(mean))
    grads = _mgiou_gradients(terms, count) if (need_pred or need_target) else (None, None)
    return (1 - similarity) / 2, grads[0] if need_pred else None, grads[1] if need_target else None


def _mgiou_gradients(f: dict, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of each pair's loss with respect to its pred and target vertices, (N, Vp, 2) and (N, Vt, 2); 0 at
    padded slots; from the forward's terms `f` and valid-axis count.

    The rules of autograd through the reference: an extreme projection's gradient goes to the first vertex that
    reaches it (as argmin/argmax pick), min/max of two equal interval ends split it in halves (torch.minimum and
    torch.maximum), the normalisation's statistics are constants, and a padded slot's gradient goes to the slot it
    reads. The loss is (1 - mean GIoU) / 2, so every valid axis's GIoU has the same gradient G = -1/2 / count: the
    gradient is G times the one for a unit gradient of each valid axis's GIoU (`_mgiou_unit_gradients`), which the
    kernel accumulates axis by axis before it knows the count.
    """
    c = count.clamp(min=1).to(f["p"].dtype)
    g = torch.where(count > 0, -0.5 / c, torch.zeros_like(c))[:, None, None]
    out = []
    for g_v, source in zip(_mgiou_unit_gradients(f), (f["p_source"], f["t_source"])):
        g_v = (g_v * g) / f["scale"]
        out.append(torch.zeros_like(g_v).scatter_add_(1, source.unsqueeze(-1).expand(-1, -1, 2), g_v))
    return out[0], out[1]


def _mgiou_unit_gradients(f: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the sum of the valid axes' GIoUs with respect to the filled, normalised pred and target vertices.

    Per valid axis: dGIoU/doverlap = 1 / hull (direct), dGIoU/dhull = -overlap / hull^2; they reach the four interval
    ends, from them the extreme vertices (times the axis) and the axis (times the vertex), and an edge's normal
    (-e_y, e_x) passes its gradient to the edge's two vertices.
    """
    p, t, axes = f["p"], f["t"], f["axes"]
    n_p, n_t = p.shape[1], t.shape[1]
    zeros = torch.zeros_like(f["giou"])
    u_overlap = torch.where(f["valid"], 1 / f["safe_hull"], zeros)
    u_hull = -(u_overlap * f["giou"])
    u_ends = u_overlap - u_hull  # overlap's total: direct, and through hull = ... - overlap
    half, zero, one = (torch.full((), x, dtype=p.dtype, device=p.device) for x in (0.5, 0.0, 1.0))
    w_hi = torch.where(f["p_hi"] < f["t_hi"], one, torch.where(f["p_hi"] == f["t_hi"], half, zero))
    w_lo = torch.where(f["p_lo"] > f["t_lo"], one, torch.where(f["p_lo"] == f["t_lo"], half, zero))
    d = {"p_hi": u_hull + u_ends * w_hi, "t_hi": u_hull + u_ends * (1 - w_hi),
         "p_lo": -u_hull - u_ends * w_lo, "t_lo": -u_hull - u_ends * (1 - w_lo)}

    def extreme(v, at):
        return torch.gather(v, 1, at.unsqueeze(-1).expand(-1, -1, 2))  # (N, M, 2)

    g_p, g_t = torch.zeros_like(p), torch.zeros_like(t)
    g_axes = torch.zeros_like(axes)
    for name, v, g_v in (("p_hi", p, g_p), ("p_lo", p, g_p), ("t_hi", t, g_t), ("t_lo", t, g_t)):
        at = f[name + "_at"]
        g_v.scatter_add_(1, at.unsqueeze(-1).expand(-1, -1, 2), d[name][..., None] * axes)
        g_axes = g_axes + d[name][..., None] * extreme(v, at)
    for g_v, g_normal in ((g_p, g_axes[:, :n_p]), (g_t, g_axes[:, n_p:n_p + n_t])):
        g_edge = torch.stack((g_normal[..., 1], -g_normal[..., 0]), dim=-1)  # normal (-e_y, e_x)
        g_v += torch.roll(g_edge, shifts=1, dims=1) - g_edge  # edge i = v[i + 1] - v[i]
    return g_p, g_t
