"""Task-aligned assignment (TOOD), numerically equal to Ultralytics 8.4.190's TaskAlignedAssigner.

A pure function: settings come in a frozen dataclass, tensors in, an `Assignment` out; no module state.
Fully vectorised over images, ground truths and anchors (dense (B, n, A) masks; no host sync on accelerators, where
the candidate test, CIoU and metric chain run as one fused pass: `losses._kernels.assign_metrics`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _kernels
from ._kernels import spec
from ._boxes import bbox_ciou, xywh2xyxy, xyxy2xywh
from ._validate import LossInputError


@dataclasses.dataclass(frozen=True)
class AssignerConfig:
    """topk candidates per gt; metric = score^alpha * CIoU^beta.

    `ensure_coverage` is the R11 remedy; off (the default) is Ultralytics' behaviour.
    """

    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    eps: float = 1e-9
    ensure_coverage: bool = False

    def __post_init__(self):
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk is {self.topk!r}; expected a positive int")
        if self.eps <= 0:
            raise ValueError(f"eps is {self.eps!r}; expected a number > 0")


class Assignment(NamedTuple):
    """Per anchor: target_labels (B, A) long, target_bboxes (B, A, 4) xyxy pixels, target_score (B, A) float (the soft
    target at the anchor's class; 0 for background), fg_mask (B, A) bool, target_gt_idx (B, A) long index into that
    image's own padded gt list (not the flat batch); and num_classes."""

    target_labels: torch.Tensor
    target_bboxes: torch.Tensor
    target_score: torch.Tensor
    fg_mask: torch.Tensor
    target_gt_idx: torch.Tensor
    num_classes: int

    @property
    def target_scores(self) -> torch.Tensor:
        """The dense soft targets (B, A, nc): target_score at each anchor's class, 0 elsewhere (built on access)."""
        return spec.class_targets(self.target_labels, self.target_score, self.num_classes).transpose(1, 2)


def task_aligned_assign(
    pd_scores: torch.Tensor,
    pd_bboxes: torch.Tensor,
    anchor_points: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_bboxes: torch.Tensor,
    mask_gt: torch.Tensor,
    strides: Sequence[float],
    config: AssignerConfig = AssignerConfig(),
) -> Assignment:
    """Assign ground truths to anchors.

    pd_scores (B, A, nc) probabilities; pd_bboxes (B, A, 4) xyxy pixels; anchor_points (A, 2) pixels;
    gt_labels (B, n, 1); gt_bboxes (B, n, 4) xyxy pixels; mask_gt (B, n, 1) true for real (non-padding) boxes;
    strides: one per level. Gt sides smaller than `strides[1]` (or `strides[0]` with one level) are enlarged to it
    about their centre when choosing candidate anchors.
    """
    with torch.no_grad():
        return _assign(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt.bool(), strides, config)


def _assign(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt, strides, cfg,
            dense: bool | None = None) -> Assignment:
    """The assignment; `dense` picks the metric evaluation order (None: dense on accelerators, see `_metrics`)."""
    b, a, nc = pd_scores.shape
    n = gt_bboxes.shape[1]
    if n == 0:
        return Assignment(
            torch.full((b, a), nc, dtype=torch.long, device=pd_scores.device),
            torch.zeros_like(pd_bboxes),
            torch.zeros((b, a), dtype=pd_scores.dtype, device=pd_scores.device),
            torch.zeros((b, a), dtype=torch.bool, device=pd_scores.device),
            torch.zeros((b, a), dtype=torch.long, device=pd_scores.device),
            nc,
        )
    if a < cfg.topk:
        raise LossInputError(
            f"task_aligned_assign got {a} anchors; expected at least topk = {cfg.topk} "
            "(use larger feature maps or a smaller AssignerConfig.topk)"
        )
    min_side = float(strides[1] if len(strides) > 1 else strides[0])
    labels = gt_labels.long().squeeze(-1)  # (B, n)
    if dense is None:
        dense = pd_scores.device.type != "cpu"
    if dense:
        # Accelerators: one pass over the dense (B, n, A) pairs, no host sync; the fused kernel where Triton runs,
        # else its spec (equal to _anchors_in_boxes + the dense _metrics bit for bit, tests/test_kernels.py).
        candidate, overlaps, align = _kernels.assign_metrics(
            pd_scores, pd_bboxes, anchor_points, labels, gt_bboxes, mask_gt.squeeze(-1), min_side, cfg.alpha, cfg.beta
        )
    else:
        candidate = _anchors_in_boxes(anchor_points, gt_bboxes, mask_gt, min_side) & mask_gt  # (B, n, A)
        overlaps, align = _metrics(pd_scores, pd_bboxes, labels, gt_bboxes, candidate, cfg, dense=False)

    rescued = None
    if cfg.ensure_coverage:
        mask_pos = spec.resolve_conflicts(spec.top_candidates(align, mask_gt, cfg.topk) & candidate, overlaps)
        mask_pos, rescued = _ensure_coverage(mask_pos, candidate, align, anchor_points, gt_bboxes)
        positives = spec.summarise_positives(mask_pos, align, overlaps)
    else:  # one fused pass after torch's top-k where the kernels run (the same positives: tests/test_kernels.py)
        positives = _kernels.assign_positives(align, overlaps, candidate, mask_gt, cfg.topk)
    fg_mask, target_gt_idx = positives.fg, positives.gt_index
    target_labels = labels.gather(1, target_gt_idx).clamp(0)
    target_bboxes = gt_bboxes.gather(1, target_gt_idx.unsqueeze(-1).expand(-1, -1, 4))

    # Soft targets: each gt's metrics rescaled so its best positive reaches its best IoU. After conflict resolution an
    # anchor is positive for at most one gt, so its score is read at target_gt_idx instead of a max over all gts.
    zero = torch.zeros((), dtype=align.dtype, device=align.device)
    best_overlap = positives.best_overlap.gather(1, target_gt_idx)
    norm = positives.own_align * best_overlap / (positives.best_align.gather(1, target_gt_idx) + cfg.eps)
    norm = torch.where(fg_mask, norm, zero)
    if rescued is not None:
        # A rescued positive of a gt with zero metric everywhere still needs weight, or it teaches nothing.
        norm = torch.where(rescued & (norm == 0), torch.ones_like(norm), norm)
    return Assignment(target_labels, target_bboxes, norm, fg_mask, target_gt_idx, nc)


def _anchors_in_boxes(anchor_points, gt_bboxes, mask_gt, min_side: float) -> torch.Tensor:
    """(B, n, A) bool: anchor strictly inside the gt box, whose sides below `min_side` are enlarged to it."""
    xywh = xyxy2xywh(gt_bboxes)
    small = (xywh[..., 2:] < min_side) & mask_gt
    xywh = torch.cat((xywh[..., :2], torch.where(small, torch.full_like(xywh[..., 2:], min_side), xywh[..., 2:])), -1)
    boxes = xywh2xyxy(xywh).unsqueeze(2)  # (B, n, 1, 4)
    x, y = anchor_points[:, 0], anchor_points[:, 1]
    eps = 1e-9
    return (
        (x - boxes[..., 0] > eps) & (y - boxes[..., 1] > eps) & (boxes[..., 2] - x > eps) & (boxes[..., 3] - y > eps)
    )


def _metrics(pd_scores, pd_bboxes, labels, gt_bboxes, candidate, cfg, dense: bool | None = None):
    """CIoU (clamped at 0) and alignment metric per (image, gt, anchor); exactly 0 for non-candidates.

    Two evaluation orders with identical per-pair arithmetic: dense over all (B, n, A) pairs (no host sync) or only
    over candidate pairs (a nonzero(), i.e. a sync, but about 40x fewer pairs; the choice on CPU, where a sync is free
    and the dense work dominated the loss's run time). On accelerators `_assign` runs the dense order fused
    (`losses._kernels.assign_metrics`); the dense order here is the reference its spec is held to.
    """
    b, a, _ = pd_scores.shape
    n = labels.shape[1]
    zero = torch.zeros((), dtype=pd_bboxes.dtype, device=pd_bboxes.device)
    if dense is None:
        dense = pd_scores.device.type != "cpu"
    if dense:
        ciou = bbox_ciou(gt_bboxes.unsqueeze(2), pd_bboxes.unsqueeze(1)).clamp(0)  # (B, n, A)
        overlaps = torch.where(candidate, ciou, zero)
        cls_prob = pd_scores.transpose(1, 2).gather(1, labels.unsqueeze(-1).expand(b, n, a))  # (B, n, A)
        align = torch.where(candidate, cls_prob.pow(cfg.alpha) * overlaps.pow(cfg.beta), zero)
        return overlaps, align
    bi, gi, ai = candidate.nonzero(as_tuple=True)
    ciou = bbox_ciou(gt_bboxes[bi, gi], pd_bboxes[bi, ai]).clamp(0)
    cls_prob = pd_scores[bi, ai, labels[bi, gi]]
    overlaps = torch.zeros((b, n, a), dtype=pd_bboxes.dtype, device=pd_bboxes.device)
    align = torch.zeros((b, n, a), dtype=pd_scores.dtype, device=pd_scores.device)
    overlaps[bi, gi, ai] = ciou
    align[bi, gi, ai] = cls_prob.pow(cfg.alpha) * ciou.pow(cfg.beta)
    return overlaps, align


def _ensure_coverage(mask_pos, candidate, align, anchor_points, gt_bboxes):
    """Give each gt with candidates but no weighted positive (one with metric > 0, hence a non-zero target score) its
    best candidate (by metric, then distance to the box centre).

    A rescued anchor is taken from any other gt it was positive for (the lowest-index rescuer wins a shared anchor).
    Returns the new mask and a (B, A) bool of rescued anchors.
    """
    starving = candidate.any(-1) & ~(mask_pos & (align > 0)).any(-1)  # (B, n)
    neg_inf = torch.tensor(float("-inf"), dtype=align.dtype, device=align.device)
    metric = torch.where(candidate, align, neg_inf)
    best = metric == metric.amax(-1, keepdim=True)
    centre = (gt_bboxes[..., :2] + gt_bboxes[..., 2:]) / 2  # (B, n, 2)
    dist2 = (anchor_points.unsqueeze(0).unsqueeze(0) - centre.unsqueeze(2)).pow(2).sum(-1)  # (B, n, A)
    dist2 = torch.where(candidate & best, dist2, torch.full_like(dist2, float("inf")))
    pick = torch.zeros_like(mask_pos).scatter_(-1, dist2.argmin(-1, keepdim=True), True) & starving.unsqueeze(-1)
    rescued = pick.any(1)  # (B, A)
    first = torch.zeros_like(pick).scatter_(1, pick.to(torch.uint8).argmax(1, keepdim=True), True) & pick
    mask_pos = torch.where(rescued.unsqueeze(1), first, mask_pos)
    return mask_pos, rescued
