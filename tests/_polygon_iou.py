"""The exact polygon IoU oracle, for our tests: it lives in the harness (`headguard._polygon_iou`), which the
shape-loss catalogue's IoU-ranking check needs; one definition."""

from headguard._polygon_iou import intersection, polygon_iou, signed_area

__all__ = ["intersection", "polygon_iou", "signed_area"]
