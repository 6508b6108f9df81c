"""Reference losses (torch only)."""

from ._boxes import bbox2dist, bbox_ciou, dfl_loss, dist2bbox, xywh2xyxy, xyxy2xywh
from ._validate import LossInputError
from .assigner import AssignerConfig, Assignment, task_aligned_assign
from .detection import DetectionGains, DetectionLoss, DetectionTargets

__all__ = [
    "AssignerConfig",
    "Assignment",
    "DetectionGains",
    "DetectionLoss",
    "DetectionTargets",
    "LossInputError",
    "bbox2dist",
    "bbox_ciou",
    "dfl_loss",
    "dist2bbox",
    "task_aligned_assign",
    "xywh2xyxy",
    "xyxy2xywh",
]
