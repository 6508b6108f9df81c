"""Reference heads (torch only)."""

from .detect import Detect
from .polygon import Polygon, decode_polygons

__all__ = ["Detect", "Polygon", "decode_polygons"]
