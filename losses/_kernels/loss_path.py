"""Prototype: the losses' fast path (`losses._fast`, one host sync, CUDA graphs) with the fused kernels in its core.

`KernelDetectionLoss` / `KernelPolygonLoss` take the arguments of `DetectionLoss` / `PolygonLoss` and always use the
fast path; its static core decodes with the fused DFL expectation, assigns with the fused metric chain and takes the
DFL term from the fused positive cross-entropy, whose gradient the expectation's backward writes in the same pass.
Everything else (checks, slots, positives index, CIoU and BCE terms, polygon terms) is the fast path's own.
Without Triton or CUDA the kernels' specs run, so results match the reference everywhere (tests/test_kernels.py).

A prototype beside the loss, not inside it: the integration belongs in `FastPath._detection_core` (see the note in
docs/benchmarks.md, "Fused kernels").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heads._decode import dist2bbox

from .._boxes import bbox2dist, bbox_ciou
from .._fast import FastPath, positive_index
from ..detection import DetectionLoss
from ..polygon import PolygonLoss
from .assign import task_aligned_assign
from .ops import dfl_expectation


class KernelFastPath(FastPath):
    """FastPath whose detection core runs the fused kernels."""

    def _detection_core(self, boxes, scores, anchor_points, stride_tensor, labels, bboxes, mask):
        det = self.det
        b, _, a = scores.shape
        branch = dfl_expectation(boxes, det.reg_max)
        pred_bboxes = dist2bbox(branch.expectation.transpose(1, 2), anchor_points, xywh=False)  # (B, A, 4) grid units
        scores_t = scores.transpose(1, 2)
        assignment = task_aligned_assign(
            scores_t.detach().sigmoid(),
            (pred_bboxes.detach() * stride_tensor).to(bboxes.dtype),
            anchor_points * stride_tensor,
            labels, bboxes, mask.unsqueeze(-1), det.strides, det.assigner,
        )
        target_scores = assignment.target_scores
        tss = target_scores.sum().clamp(min=1)
        cls_term = F.binary_cross_entropy_with_logits(scores_t, target_scores.to(scores.dtype), reduction="sum") / tss

        index, valid = positive_index(assignment.fg_mask, min(b * a, b * labels.shape[1] * det.assigner.topk))
        image, anchor = index // a, index % a
        zero = torch.zeros((), dtype=target_scores.dtype, device=index.device)
        weight = torch.where(valid, target_scores[image, anchor].sum(-1), zero)
        pred_pos = pred_bboxes[image, anchor]
        target_pos = assignment.target_bboxes[image, anchor] / stride_tensor[anchor]
        target_pos = torch.where(valid[:, None], target_pos, pred_pos.detach())
        box_term = ((1.0 - bbox_ciou(pred_pos, target_pos)) * weight).sum() / tss
        ltrb = bbox2dist(anchor_points[anchor], target_pos, det.reg_max - 1)
        dfl_term = (branch.positive_loss(image, anchor, ltrb) * weight).sum() / tss
        g = det.gains
        terms = torch.stack((box_term * g.box, cls_term * g.cls, dfl_term * g.dfl))
        return terms, (assignment, image, anchor, valid, weight, tss)


class KernelDetectionLoss(DetectionLoss):
    """`DetectionLoss` (same arguments, less `cuda_graphs`) on the fast path with the fused kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, cuda_graphs=True, **kwargs)
        self._fast = KernelFastPath(self)


class KernelPolygonLoss(PolygonLoss):
    """`PolygonLoss` (same arguments, less `cuda_graphs`) on the fast path with the fused kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, cuda_graphs=True, **kwargs)
        self._fast = KernelFastPath(self.detection, self)
