"""Reference losses (torch only)."""

from ._boxes import bbox2dist, bbox_ciou, dfl_loss, dist2bbox, xywh2xyxy, xyxy2xywh
from ._validate import LossInputError
from .assigner import AssignerConfig, Assignment, task_aligned_assign
from .detection import DetectionGains, DetectionLoss, DetectionTargets
from .mgiou import box_corners, convexity_loss, mgiou, mgiou_boxes
from .polygon import PolygonGains, PolygonLoss
from .polygon_targets import assigned_polygon_targets, polygons_to_targets, resample_polygon

__all__ = [
    "AssignerConfig",
    "Assignment",
    "DetectionGains",
    "DetectionLoss",
    "DetectionTargets",
    "LossInputError",
    "PolygonGains",
    "PolygonLoss",
    "assigned_polygon_targets",
    "bbox2dist",
    "bbox_ciou",
    "box_corners",
    "convexity_loss",
    "dfl_loss",
    "dist2bbox",
    "mgiou",
    "mgiou_boxes",
    "polygons_to_targets",
    "resample_polygon",
    "task_aligned_assign",
    "xywh2xyxy",
    "xyxy2xywh",
]
