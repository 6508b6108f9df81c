"""Task-aligned assignment over the fused metric: `losses.assigner.task_aligned_assign` with its candidate test, CIoU
and metric chain taken from `assign_metrics` (one kernel on CUDA); top-k, conflicts, coverage and the soft targets
are the reference's own steps. Same arguments, same `Assignment`, equal results (tests/test_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..assigner import (
    AssignerConfig,
    Assignment,
    _ensure_coverage,
    _resolve_conflicts,
    _top_candidates,
)
from ..assigner import task_aligned_assign as reference_assign
from .ops import assign_metrics


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
    """As `losses.assigner.task_aligned_assign` (same arguments), with the fused metric chain."""
    n, a = gt_bboxes.shape[1], pd_scores.shape[1]
    if n == 0 or a < config.topk:  # no pairs, or the reference's error: its own code decides
        return reference_assign(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt, strides, config)
    with torch.no_grad():
        return _assign(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt.bool(), strides, config)


def _assign(pd_scores, pd_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt, strides, cfg) -> Assignment:
    b, a, nc = pd_scores.shape
    min_side = float(strides[1] if len(strides) > 1 else strides[0])
    labels = gt_labels.long().squeeze(-1)  # (B, n)
    candidate, overlaps, align = assign_metrics(
        pd_scores, pd_bboxes, anchor_points, labels, gt_bboxes, mask_gt.squeeze(-1), min_side, cfg.alpha, cfg.beta
    )
    mask_pos = _top_candidates(align, mask_gt, cfg.topk) & candidate
    mask_pos = _resolve_conflicts(mask_pos, overlaps)
    rescued = None
    if cfg.ensure_coverage:
        mask_pos, rescued = _ensure_coverage(mask_pos, candidate, align, anchor_points, gt_bboxes)

    # From here on, the reference's soft targets step for step (losses.assigner._assign).
    fg_mask, target_gt_idx = mask_pos.to(torch.int8).max(1)
    target_labels = labels.gather(1, target_gt_idx).clamp(0)
    target_bboxes = gt_bboxes.gather(1, target_gt_idx.unsqueeze(-1).expand(-1, -1, 4))
    zero = torch.zeros((), dtype=align.dtype, device=align.device)
    best_align = torch.where(mask_pos, align, zero).amax(-1)
    best_overlap = torch.where(mask_pos, overlaps, zero).amax(-1)
    own_align = align.gather(1, target_gt_idx.unsqueeze(1)).squeeze(1)
    norm = own_align * best_overlap.gather(1, target_gt_idx) / (best_align.gather(1, target_gt_idx) + cfg.eps)
    norm = torch.where(fg_mask.bool(), norm, zero)
    if rescued is not None:
        norm = torch.where(rescued & (norm == 0), torch.ones_like(norm), norm)
    target_scores = torch.zeros((b, a, nc), dtype=norm.dtype, device=norm.device)
    target_scores.scatter_(2, target_labels.unsqueeze(-1), norm.unsqueeze(-1))
    return Assignment(target_labels, target_bboxes, target_scores, fg_mask.bool(), target_gt_idx)
