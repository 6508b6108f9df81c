"""Detection loss (CIoU + DFL box terms, BCE class term), numerically equal to Ultralytics 8.4.190's v8DetectionLoss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from heads._decode import dfl_expectation, make_anchors

from ._boxes import bbox2dist, bbox_ciou, dfl_loss, dist2bbox, xywh2xyxy
from ._validate import (
    LossInputError,
    any_flag,
    check_finite,
    check_floating,
    check_integral,
    check_like,
    check_mapping,
    check_range,
    check_shape,
    check_tensor,
    check_within,
    nonintegral_flag,
    outside_flag,
    unbounded_flag,
)
from ._bounds import LOGIT_BOUND, LOGIT_RANGE, TARGET_HIGH, TARGET_LOW, TARGET_RANGE, pixel_hint
from ._fast import FastPath, check_cuda_graphs, gather_anchors, image_size, use_fast_path
from .assigner import AssignerConfig, task_aligned_assign


@dataclasses.dataclass(frozen=True)
class DetectionGains:
    """Multipliers of the box (CIoU), class (BCE) and DFL terms; defaults are Ultralytics' box/cls/dfl."""

    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5


class DetectionTargets(NamedTuple):
    """What the assigner decided, with everything a derived loss needs to gather its own targets.

    Per anchor (B images, A anchors): fg_mask (B, A) bool; target_gt_idx (B, A) long index into that image's own
    padded gt slots (NOT a flat batch row: use `gt_rows` to map); target_bboxes (B, A, 4) xyxy pixels;
    target_scores (B, A, nc); pred_bboxes (B, A, 4) xyxy in grid units (decoded, with gradient).
    Per gt slot (n = max objects in one image): gt_labels (B, n, 1), gt_bboxes (B, n, 4) xyxy pixels, mask_gt (B, n)
    bool (real box, not padding), gt_rows (B, n) long: the row of that object in the flat batch tensors, -1 for padding.
    Shared: target_scores_sum (0-d, >= 1), anchor_points (A, 2) grid units, stride_tensor (A, 1), imgsz (2,) (h, w) px.
    """

    fg_mask: torch.Tensor
    target_gt_idx: torch.Tensor
    target_bboxes: torch.Tensor
    target_scores: torch.Tensor
    target_scores_sum: torch.Tensor
    anchor_points: torch.Tensor
    stride_tensor: torch.Tensor
    pred_bboxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_bboxes: torch.Tensor
    mask_gt: torch.Tensor
    gt_rows: torch.Tensor
    imgsz: torch.Tensor


class PaddedTargets(NamedTuple):
    """Flat batch targets regrouped per image: labels (B, n, 1), boxes (B, n, 4) xyxy px, mask (B, n), rows (B, n)."""

    labels: torch.Tensor
    bboxes: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor


class DetectionLoss:
    """YOLOv8-style detection loss with explicit configuration; never reads a model.

    `loss(preds, batch)` (also `__call__`) returns (loss_vector * B, items): the vector is the gain-scaled
    [box, cls, dfl] terms times the batch size, items a dict {"box_loss", "cls_loss", "dfl_loss"} of detached 0-d
    tensors (not times B), as Ultralytics 8.4.

    preds: the head's training dict {"boxes": (B, 4*reg_max, A) logits, "scores": (B, nc, A) logits, "feats": list of
    (B, C, H, W) per level}, or its eval tuple (y, that dict).
    batch: {"batch_idx": (N,) image index of each object, "cls": (N, 1) class id, "bboxes": (N, 4) normalised xywh}.
    The class BCE is normalised by max(1, sum of target scores). Host syncs (4 on CUDA): one for the finiteness of the
    predictions, one for all value checks of the batch, the padded per-image object count (a shape) and the number of
    positives (a shape, for the box/DFL gathers).

    `cuda_graphs` picks the path. The fast path (`losses._fast`): one host sync for every check and the object count,
    then a static-shape core with the fused kernels of `losses._kernels` in it, replayed as CUDA graphs (forward and
    backward) for CUDA inputs with autograd on and run eagerly otherwise. Same vector and gradients up to summation
    order (tests/test_fast_paths.py: within 1e-5), same errors. The graphs cost memory per distinct (batch, anchors,
    padded object count) shape; at most 8 are kept, and each costs a few extra evaluations when first captured.
    `None` (the default): the fast path for CUDA predictions, unless a capture fails (an op in a user's code that
    syncs, say): from then on the eager reference; CPU predictions always take the reference path. `True`: always the
    fast path (its core eager where graphs cannot run). `False`: always the eager reference path described above.
    A batch of no image (B = 0) always takes the reference path: there is nothing to speed up.
    """

    names = ("box_loss", "cls_loss", "dfl_loss")

    def __init__(
        self,
        nc: int,
        strides: Sequence[float] | torch.Tensor,
        reg_max: int = 16,
        gains: DetectionGains = DetectionGains(),
        assigner: AssignerConfig = AssignerConfig(),
        cuda_graphs: bool | None = None,
    ):
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
            raise ValueError(f"nc is {nc!r}; expected a positive int")
        if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 2:
            raise ValueError(f"reg_max is {reg_max!r}; expected an int >= 2 (a DFL box branch)")
        strides = [float(s) for s in (strides.tolist() if isinstance(strides, torch.Tensor) else strides)]
        if not strides or not all(s > 0 for s in strides):
            raise ValueError(
                f"strides is {strides!r}; expected one positive stride per level (set the head's stride first)"
            )
        self.nc = nc
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.gains = gains
        self.assigner = assigner
        self.cuda_graphs = check_cuda_graphs(cuda_graphs)
        self._fast = None  # the fast path and its CUDA-graph cache, built on first use

    @classmethod
    def for_head(cls, head, **kwargs) -> DetectionLoss:
        """Build from a head's `nc`, `reg_max` and `stride` (read explicitly; nothing else)."""
        return cls(nc=head.nc, strides=head.stride, reg_max=head.reg_max, **kwargs)

    def __call__(self, preds, batch: Mapping[str, torch.Tensor]):
        return self.loss(preds, batch)

    def loss(self, preds, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        preds = self.parse_output(preds)
        if use_fast_path(self.cuda_graphs, self._fast, preds):
            if self._fast is None:
                self._fast = FastPath(self)
            loss = self._fast.detection_loss(preds, batch)
            terms = loss.detach() / preds["boxes"].shape[0]
        else:
            terms, _ = self.detection_terms(preds, batch)
            loss, terms = terms * preds["boxes"].shape[0], terms.detach()
        return loss, dict(zip(self.names, terms))

    @staticmethod
    def parse_output(preds):
        """Accept the training dict or the eval tuple (y, dict)."""
        return preds[1] if isinstance(preds, tuple) else preds

    def detection_terms(
        self, preds: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, DetectionTargets]:
        """Gain-scaled [box, cls, dfl] (3,) (not times B) and the assignment, for losses that add their own terms."""
        boxes, scores, feats = self._check_preds(preds)
        # Half-precision predictions (AMP) are computed in float32: the assigner's epsilons and score**alpha *
        # iou**beta underflow in fp16 and give 0/0 (R6). A no-op for float32 and float64.
        dtype = torch.promote_types(scores.dtype, torch.float32)
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        b, _, a = scores.shape
        anchor_points, stride_tensor = make_anchors(feats, self.strides)
        imgsz = image_size(self.strides, feats, scores)  # (h, w) pixels

        gt = self.pad_targets(batch, b, imgsz)
        # Softmax over bins in the head's own layout (B, 4, R, A): a softmax over a strided last dim would copy, and a
        # permuted gradient would be copied again on its way back.
        dist_logits = boxes.view(b, 4, self.reg_max, a)
        dist = dfl_expectation(boxes, self.reg_max)  # (B, 4, A) in bins
        pred_bboxes = dist2bbox(dist.transpose(1, 2), anchor_points, xywh=False)  # (B, A, 4) xyxy grid units
        scores_t = scores.transpose(1, 2)  # (B, A, nc) view

        assignment = task_aligned_assign(
            scores_t.detach().sigmoid(),
            (pred_bboxes.detach() * stride_tensor).to(gt.bboxes.dtype),
            anchor_points * stride_tensor,
            gt.labels,
            gt.bboxes,
            gt.mask.unsqueeze(-1),
            self.strides,
            self.assigner,
        )
        target_scores = assignment.target_scores
        target_scores_sum = target_scores.sum().clamp(min=1)

        cls_term = F.binary_cross_entropy_with_logits(scores_t, target_scores.to(dtype), reduction="sum")
        cls_term = cls_term / target_scores_sum
        target_bboxes_grid = assignment.target_bboxes / stride_tensor
        box_term, dfl_term = self._box_terms(
            dist_logits, pred_bboxes, anchor_points, target_bboxes_grid, target_scores, target_scores_sum,
            assignment.fg_mask,
        )
        g = self.gains
        terms = torch.stack((box_term * g.box, cls_term * g.cls, dfl_term * g.dfl))
        targets = DetectionTargets(
            assignment.fg_mask, assignment.target_gt_idx, assignment.target_bboxes, target_scores, target_scores_sum,
            anchor_points, stride_tensor, pred_bboxes, gt.labels, gt.bboxes, gt.mask, gt.rows, imgsz,
        )
        return terms, targets

    def _box_terms(self, dist_logits, pred_bboxes, anchor_points, target_bboxes, target_scores, tss, fg_mask):
        """CIoU and DFL terms over positives, each weighted by its summed target score; both 0 with no positives."""
        fg = fg_mask.nonzero(as_tuple=True)  # shape-determining: the number of positives
        weight = target_scores[fg].sum(-1)
        ciou = bbox_ciou(pred_bboxes[fg], target_bboxes[fg])
        box_term = ((1.0 - ciou) * weight).sum() / tss
        target_ltrb = bbox2dist(anchor_points[fg[1]], target_bboxes[fg], self.reg_max - 1)
        # gather_anchors, not dist_logits[fg[0], :, :, fg[1]]: autograd's index backward permutes and copies the whole
        # (B, 4, R, A) gradient (see losses._fast.gather_anchors).
        b, _, r, a = dist_logits.shape
        logits = gather_anchors(dist_logits.view(b, 4 * r, a), *fg).view(-1, 4, r)
        dfl_term = (dfl_loss(logits, target_ltrb) * weight).sum() / tss
        return box_term, dfl_term

    def pad_targets(self, batch: Mapping[str, torch.Tensor], batch_size: int, imgsz: torch.Tensor) -> PaddedTargets:
        """Regroup the flat batch per image (stable: rows keep their order within an image) into padded slots."""
        batch_idx, cls, bboxes = self._check_batch(batch, batch_size, imgsz)
        counts = self.image_counts(batch_idx, batch_size)
        n = int(counts.max()) if batch_idx.numel() else 0  # the one shape-determining sync
        return self.fill_slots(batch_idx, cls, bboxes, counts, n, imgsz)

    @staticmethod
    def image_counts(batch_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Objects per image (B,) long; scatter_add, not bincount: bincount syncs on CUDA to size its output."""
        return torch.zeros(batch_size, dtype=torch.long, device=batch_idx.device).scatter_add_(
            0, batch_idx, torch.ones_like(batch_idx)
        )

    @staticmethod
    def fill_slots(batch_idx, cls, bboxes, counts, n: int, imgsz: torch.Tensor) -> PaddedTargets:
        """Checked flat targets -> `n` slots per image (n >= the largest count; the extra slots are padding)."""
        batch_size = counts.shape[0]
        device, dtype = imgsz.device, imgsz.dtype
        labels = torch.zeros((batch_size, n, 1), dtype=dtype, device=device)
        boxes = torch.zeros((batch_size, n, 4), dtype=dtype, device=device)
        mask = torch.zeros((batch_size, n), dtype=torch.bool, device=device)
        rows = torch.full((batch_size, n), -1, dtype=torch.long, device=device)
        if n and batch_idx.numel():
            # A row's slot is the number of rows of its image before it: a running count along each image's row of
            # a (B, N) one-hot, not a sort (CUDA's sort of a few hundred keys is one 27 us kernel). The count runs
            # along the contiguous last dim: CUDA scans an outer dim with one thread per column, serially (95 us for
            # 512 rows of 43 images on an H200), the innermost one in parallel.
            images = torch.arange(batch_size, device=device)
            slot = (batch_idx == images[:, None]).cumsum(1).gather(0, batch_idx[None])[0] - 1
            row_ids = torch.arange(batch_idx.numel(), device=device)
            flat = batch_idx * n + slot  # index_copy_ into flat views: no bounds-check sync, unlike index_put
            labels.view(-1).index_copy_(0, flat, cls.to(dtype))
            scale = imgsz.flip(0).repeat(2)  # (w, h, w, h)
            boxes.view(-1, 4).index_copy_(0, flat, xywh2xyxy(bboxes.to(dtype) * scale))
            mask.view(-1).index_fill_(0, flat, True)
            rows.view(-1).index_copy_(0, flat, row_ids)
        return PaddedTargets(labels, boxes, mask, rows)

    def _check_preds(self, preds):
        described = "the head's dict with {keys} (or the eval tuple (y, dict))"
        check_mapping("preds", preds, ("boxes", "scores", "feats"), described)
        boxes = check_tensor("preds['boxes']", preds["boxes"])
        scores = check_tensor("preds['scores']", preds["scores"])
        feats = preds["feats"]
        if not isinstance(feats, (list, tuple)) or len(feats) != len(self.strides):
            found = f"{len(feats)} levels" if isinstance(feats, (list, tuple)) else f"a {type(feats).__name__}"
            raise LossInputError(f"preds['feats'] has {found}; expected a list of {len(self.strides)} (one per stride)")
        for i, f in enumerate(feats):
            check_tensor(f"preds['feats'][{i}]", f)
            check_shape(f"preds['feats'][{i}]", f, (None, None, None, None), "(B, C, H, W)")
        check_floating("preds['scores']", scores)
        check_shape("preds['scores']", scores, (None, self.nc, None), f"(B, nc={self.nc}, A)")
        b, _, a = scores.shape
        anchors = sum(int(f.shape[2] * f.shape[3]) for f in feats)
        check_shape("preds['scores']", scores, (b, self.nc, anchors), f"(B, nc, A) with A = {anchors} from feats")
        check_shape("preds['boxes']", boxes, (b, 4 * self.reg_max, a), f"(B, 4*reg_max, A) with reg_max={self.reg_max}")
        check_like("preds['boxes']", boxes, "preds['scores']", scores)
        # One sync for both tensors' finiteness and range; details only on failure.
        bound = LOGIT_BOUND
        if any_flag(unbounded_flag(scores, -bound, bound), unbounded_flag(boxes, -bound, bound)):
            expected = "finite logits — the head produced NaN/Inf, fix the head rather than masking"
            check_finite("preds['scores']", scores, expected)
            check_finite("preds['boxes']", boxes, expected)
            for name, t in (("preds['scores']", scores), ("preds['boxes']", boxes)):
                check_within(name, t, -bound, bound, LOGIT_RANGE)
        return boxes, scores, feats

    def _check_batch(self, batch, batch_size: int, imgsz: torch.Tensor):
        check_mapping("batch", batch, ("batch_idx", "cls", "bboxes"), "a dict with {keys}")
        batch_idx = check_tensor("batch['batch_idx']", batch["batch_idx"])
        cls = check_tensor("batch['cls']", batch["cls"])
        bboxes = check_tensor("batch['bboxes']", batch["bboxes"])
        check_shape("batch['batch_idx']", batch_idx, (None,), "(N,): the image index of each object")
        count = batch_idx.shape[0]
        if cls.ndim == 1:
            cls = cls.unsqueeze(-1)
        check_shape("batch['cls']", cls, (count, 1), f"(N, 1) with N = {count} from batch['batch_idx']")
        check_shape("batch['bboxes']", bboxes, (count, 4), f"(N, 4) normalised xywh with N = {count}")
        for name, t in (("batch['batch_idx']", batch_idx), ("batch['cls']", cls), ("batch['bboxes']", bboxes)):
            check_like(name, t, "preds['scores']", imgsz, dtype=False)
        check_floating("batch['bboxes']", bboxes)
        flags = (
            unbounded_flag(bboxes, TARGET_LOW, TARGET_HIGH), nonintegral_flag(batch_idx), nonintegral_flag(cls),
            outside_flag(batch_idx, 0, batch_size), outside_flag(cls, 0, self.nc),
            outside_flag(bboxes[:, 2:], 0, math.inf),
        )
        if any_flag(*flags):  # one sync for all value checks; the detailed checks below name the first problem
            check_finite("batch['bboxes']", bboxes, "finite normalised xywh boxes")
            check_within("batch['bboxes']", bboxes, TARGET_LOW, TARGET_HIGH, "normalised xywh " + TARGET_RANGE,
                         pixel_hint(imgsz))
            check_integral("batch['batch_idx']", batch_idx)
            check_integral("batch['cls']", cls)
            check_range(
                "batch['batch_idx']", batch_idx, 0, batch_size,
                f"image indices in [0, {batch_size}) for batch size {batch_size}",
            )
            check_range("batch['cls']", cls, 0, self.nc, f"class ids in [0, {self.nc}) for nc={self.nc}")
            check_range("batch['bboxes'][:, 2:] (w, h)", bboxes[:, 2:], 0, math.inf, "non-negative box sizes")
        return batch_idx.long(), cls.long().squeeze(-1), bboxes
