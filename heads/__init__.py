"""Reference heads (torch only)."""

from .detect import Detect

__all__ = ["Detect"]
