"""Polygon loss: the detection loss's box/cls/dfl terms, unchanged, plus one vertex term (l2, a shape loss or a blend).

The vertex term per positive anchor k (`losses._vertex`, one definition for both paths), with summed target score
w_k (the box term's weight):

- "l2": mean over real vertices of |pred - target|^2 / (area + AREA_EPS), area = the matched box's w*h, everything in
  that anchor's stride units (OKS-like: a fixed error costs less on a large object; padded vertices excluded);
- a shape loss `vertex_loss(pred, target, pred_mask=None, target_mask=mask)` in the signature of `losses.mgiou` (the
  default): `mode="mgiou"`, or any callable given as `vertex_loss`;
- "hybrid": (1 - progress) * l2 + progress * shape loss, a pure function of (pred, target, progress): no running state.

polygon term = gains.polygon * sum_k(w_k * loss_k) / max(1, sum of target scores), normalised once over the whole
batch exactly like the box term, so it does not grow with the batch size (R4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ._bounds import TARGET_HIGH, TARGET_LOW, TARGET_RANGE, VERTEX_OFFSET_BOUND, pixel_hint
from ._fast import FastPath, check_cuda_graphs, positive_vertices, use_fast_path
from ._validate import LossInputError, check_bounded, check_flag, check_floating, check_like, check_shape, check_tensor
from ._vertex import AREA_EPS, MODES, ShapeLoss, resolve_vertex_term, unchecked, vertex_term
from .assigner import AssignerConfig
from .detection import DetectionGains, DetectionLoss, DetectionTargets
from .polygon_targets import _check_num_vertices, assigned_polygon_targets

__all__ = ["AREA_EPS", "MODES", "PolygonGains", "PolygonLoss", "PolygonTerms", "polygon_vertex_loss"]


@dataclasses.dataclass(frozen=True)
class PolygonGains:
    """Multipliers of the box (CIoU), polygon, class (BCE) and DFL terms; box/cls/dfl default to Ultralytics'."""

    box: float = 7.5
    polygon: float = 12.0
    cls: float = 0.5
    dfl: float = 1.5

    def detection(self) -> DetectionGains:
        return DetectionGains(box=self.box, cls=self.cls, dfl=self.dfl)


class PolygonTerms(NamedTuple):
    """Everything behind one loss evaluation (for tests and tools; `PolygonLoss.loss` returns only the vector).

    vector (4,): gain-scaled [box, polygon, cls, dfl], not times B. For the P positive anchors in `fg_mask.nonzero()`
    order: pred (P, V, 2) and target (P, V, 2) vertices in each anchor's stride units, mask (P, V) real target
    vertices, rows (P,) flat batch row of the matched object, per_anchor (P,) vertex loss, weight (P,) summed target
    score. polygon = gains.polygon * (per_anchor * weight).sum() / detection.target_scores_sum.
    """

    vector: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    per_anchor: torch.Tensor
    weight: torch.Tensor
    detection: DetectionTargets


def polygon_vertex_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, area: torch.Tensor, mode: str | None,
    progress: float = 0.0, vertex_loss: ShapeLoss | None = None,
) -> torch.Tensor:
    """Per-polygon vertex loss (P,) of pred/target (P, V, 2), mask (P, V) (>= 1 real vertex each), area (P,).

    Pure: the result depends only on the arguments; `mode` and `vertex_loss` as in `PolygonLoss`. Computed in float32
    at least. `area` is only used by "l2" and "hybrid".
    """
    term, shape_loss = resolve_vertex_term(mode, vertex_loss)
    return vertex_term(pred, target, mask, area, term, progress, unchecked(shape_loss), mask)


def _raise_empty_polygons(mask: torch.Tensor) -> None:
    rows = (~mask.any(-1)).nonzero().flatten()[:5].tolist()
    raise LossInputError(f"batch['polygon_mask'] has no real vertex in rows {rows}; expected at least one per polygon")


class PolygonLoss:
    """Detection loss plus a polygon vertex term; explicit configuration, no model access, no state between calls.

    `loss(preds, batch, progress=0.0)` (also `__call__`) returns (loss_vector * B, items): the vector is the
    gain-scaled [box, polygon, cls, dfl], items {"box_loss", "polygon_loss", "cls_loss", "dfl_loss"} detached 0-d
    tensors (not times B). box/cls/dfl are `DetectionLoss.detection_terms` on the same inputs, bit for bit.

    preds: the Polygon head's training dict (Detect's keys plus "polygons" (B, 2*np, A) raw offsets) or its eval
    tuple. batch: DetectionLoss's keys plus "polygons" (N, np, 2) normalised xy and optional "polygon_mask" (N, np)
    bool (True = real vertex; at least one per polygon; padded vertices are never read). progress in [0, 1] is the
    fraction of training done; only "hybrid" uses it.

    The vertex term: `mode` "l2" (the default when neither is given), "mgiou" or "hybrid", or `vertex_loss=fn`, a
    shape loss with the signature of `losses.mgiou` (fn(pred (N, V, 2), target (N, V, 2), pred_mask=None,
    target_mask=None) -> (N,)): alone it is the whole term, with mode="hybrid" the term blends from l2 to it. fn gets
    float32 (float64) vertices in stride units and the target's real-vertex mask (None where every vertex is real).
    mode="l2" with a vertex_loss, or mode="mgiou" with another one, is ambiguous and raises ValueError. After
    construction `term` is "l2", "shape" or "hybrid" and `vertex_loss` the shape loss (None for "l2").

    `cuda_graphs` picks the path as in `DetectionLoss`: None (the default) the fast path (`losses._fast`: one sync,
    fused kernels, CUDA graphs) for CUDA predictions while capture works, the eager reference otherwise and on the
    CPU; True always the fast path; False always the reference. Same vector and gradients up to summation order,
    same errors. A `vertex_loss` that syncs cannot be captured: by default that loss then runs the reference path.
    """

    names = ("box_loss", "polygon_loss", "cls_loss", "dfl_loss")

    def __init__(
        self,
        nc: int,
        strides: Sequence[float] | torch.Tensor,
        np: int = 8,
        reg_max: int = 16,
        mode: str | None = None,
        gains: PolygonGains = PolygonGains(),
        assigner: AssignerConfig = AssignerConfig(),
        cuda_graphs: bool | None = None,
        vertex_loss: ShapeLoss | None = None,
    ):
        _check_num_vertices(np)
        self.term, self.vertex_loss = resolve_vertex_term(mode, vertex_loss)
        if not isinstance(gains, PolygonGains):
            raise TypeError(f"gains is a {type(gains).__name__}; expected a PolygonGains")
        self.np = np
        self.gains = gains
        self.cuda_graphs = check_cuda_graphs(cuda_graphs)
        self.detection = DetectionLoss(nc, strides, reg_max=reg_max, gains=gains.detection(), assigner=assigner,
                                       cuda_graphs=cuda_graphs)
        self._fast = None  # the fast path and its CUDA-graph cache, built on first use

    @property
    def shape_loss(self) -> ShapeLoss | None:
        """What both paths call for the shape term: `vertex_loss`, or MGIoU without its input checks (done here)."""
        return unchecked(self.vertex_loss)

    @classmethod
    def for_head(cls, head, **kwargs) -> PolygonLoss:
        """Build from a head's `nc`, `np`, `reg_max` and `stride` (read explicitly; nothing else)."""
        return cls(nc=head.nc, strides=head.stride, np=head.np, reg_max=head.reg_max, **kwargs)

    def __call__(self, preds, batch: Mapping[str, torch.Tensor], progress: float = 0.0):
        return self.loss(preds, batch, progress)

    def loss(self, preds, batch: Mapping[str, torch.Tensor], progress: float = 0.0):
        preds = DetectionLoss.parse_output(preds)
        if use_fast_path(self.cuda_graphs, self._fast, preds):
            if self._fast is None:
                self._fast = FastPath(self.detection, self)
            loss = self._fast.polygon_loss(preds, batch, self._check_progress(progress))
            vector = loss.detach() / preds["scores"].shape[0]
        else:
            vector = self.terms(preds, batch, progress).vector
            loss, vector = vector * preds["scores"].shape[0], vector.detach()
        return loss, dict(zip(self.names, vector))

    def terms(self, preds, batch: Mapping[str, torch.Tensor], progress: float = 0.0) -> PolygonTerms:
        """The loss vector (not times B) and the per-positive quantities behind the polygon term."""
        preds = DetectionLoss.parse_output(preds)
        progress = self._check_progress(progress)
        detection_vector, det = self.detection.detection_terms(preds, batch)
        raw = self._check_pred_polygons(preds)
        polygons, polygon_mask = self._check_batch_polygons(batch, det.imgsz)

        w, h = det.imgsz[1], det.imgsz[0]
        scale = torch.stack((w, h)).to(polygons.dtype)
        target, mask, rows = assigned_polygon_targets(
            polygons * scale, polygon_mask, det.gt_rows, det.target_gt_idx, det.fg_mask, det.stride_tensor
        )
        image, anchor = det.fg_mask.nonzero(as_tuple=True)
        # Finite: the raw offsets are within VERTEX_OFFSET_BOUND, far inside decode_polygons' finite range.
        pred = positive_vertices(raw, image, anchor, det.anchor_points, det.stride_tensor)

        box = det.target_bboxes[image, anchor] / det.stride_tensor[anchor]
        area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
        per_anchor = vertex_term(pred, target, mask, area, self.term, progress, self.shape_loss, mask)
        weight = det.target_scores[image, anchor].sum(-1).to(per_anchor.dtype)
        polygon_term = (per_anchor * weight).sum() / det.target_scores_sum * self.gains.polygon

        dtype = torch.promote_types(detection_vector.dtype, polygon_term.dtype)
        box_t, cls_t, dfl_t = detection_vector.to(dtype).unbind()
        vector = torch.stack((box_t, polygon_term.to(dtype), cls_t, dfl_t))
        return PolygonTerms(vector, pred, target, mask, rows, per_anchor, weight, det)

    def _check_pred_polygons(self, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "polygons" not in preds:
            raise LossInputError(
                f"preds has no 'polygons' entry (keys: {sorted(preds)}); expected the Polygon head's raw vertex "
                f"offsets (B, 2*np, A) with np={self.np}"
            )
        raw = check_tensor("preds['polygons']", preds["polygons"])
        scores = preds["scores"]
        b, _, a = scores.shape
        check_floating("preds['polygons']", raw)
        check_shape("preds['polygons']", raw, (b, 2 * self.np, a), f"(B, 2*np, A) with np={self.np}, B and A as scores")
        check_like("preds['polygons']", raw, "preds['scores']", scores, dtype=False)
        check_bounded("preds['polygons']", raw, -VERTEX_OFFSET_BOUND, VERTEX_OFFSET_BOUND,
                      "finite offsets: the head produced NaN/Inf, fix the head rather than masking",
                      f"raw offsets in [-{VERTEX_OFFSET_BOUND:g}, {VERTEX_OFFSET_BOUND:g}], where the loss is "
                      "guaranteed finite in float32 (losses._bounds); larger offsets mean the head has diverged")
        return raw

    def _check_batch_polygons(self, batch: Mapping[str, torch.Tensor], imgsz: torch.Tensor):
        """(N, np, 2) normalised polygons in float32 at least, and their (N, np) mask (all True when not given)."""
        if "polygons" not in batch:
            raise LossInputError(
                f"batch has no 'polygons' entry (keys: {sorted(batch)}); expected (N, np, 2) normalised xy with "
                f"np={self.np} (see losses.polygons_to_targets)"
            )
        polygons = check_tensor("batch['polygons']", batch["polygons"])
        count = batch["batch_idx"].shape[0]
        check_floating("batch['polygons']", polygons)
        check_shape("batch['polygons']", polygons, (count, self.np, 2),
                    f"(N, np, 2) normalised xy with N = {count} from batch['batch_idx'] and np={self.np}")
        check_like("batch['polygons']", polygons, "preds['scores']", imgsz, dtype=False)
        mask = batch.get("polygon_mask")
        if mask is None:
            mask = torch.ones(polygons.shape[:2], dtype=torch.bool, device=polygons.device)
        else:
            check_tensor("batch['polygon_mask']", mask)
            if mask.dtype != torch.bool:
                raise LossInputError(
                    f"batch['polygon_mask'] has dtype {mask.dtype}; expected torch.bool (True = real vertex)"
                )
            check_shape("batch['polygon_mask']", mask, (count, self.np), f"(N, np) with N = {count} and np={self.np}")
            check_like("batch['polygon_mask']", mask, "batch['polygons']", polygons, dtype=False)
        real = torch.where(mask[..., None], polygons, torch.zeros_like(polygons))  # padded vertices are never read
        check_bounded("batch['polygons'] (real vertices)", real, TARGET_LOW, TARGET_HIGH,
                      "finite normalised xy for every real vertex", "normalised xy " + TARGET_RANGE, pixel_hint(imgsz))
        if count:
            check_flag(mask.any(-1).all(), lambda: _raise_empty_polygons(mask))
        return polygons.to(torch.promote_types(polygons.dtype, torch.float32)), mask

    @staticmethod
    def _check_progress(progress) -> float:
        if isinstance(progress, torch.Tensor) and progress.numel() == 1:
            progress = progress.item()
        if isinstance(progress, bool) or not isinstance(progress, (int, float)):
            raise LossInputError(f"progress is a {type(progress).__name__}; expected a float in [0, 1]")
        if not (math.isfinite(progress) and 0.0 <= progress <= 1.0):
            raise LossInputError(f"progress is {progress!r}; expected a float in [0, 1] (fraction of training done)")
        return float(progress)
