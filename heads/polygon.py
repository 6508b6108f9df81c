"""Polygon head: Detect plus a vertex branch `cv4`; vertices decode with `heads._decode.decode_polygons`.

There is ONE vertex decode, `decode_polygons` (heads/_decode.py, re-exported here): `Polygon.decode` (inference) and
`losses.PolygonLoss` (training) both call it, so the two can never disagree (R9: no inference-only clamp).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._blocks import Conv
from ._decode import DECODE_RAW_BOUND, decode_polygons, make_anchors
from .detect import Detect

__all__ = ["DECODE_RAW_BOUND", "Polygon", "decode_polygons"]


class Polygon(Detect):
    """Detect plus `cv4`: per level Conv 3x3 -> Conv 3x3 -> 1x1 Conv2d to 2*np interleaved (x, y) vertex offsets.

    Training forward: Detect's dict plus "polygons" (B, 2*np, A), raw offsets. Eval forward: (y, preds) with
    y (B, 4 + nc + 2*np, A): Detect's xywh boxes and scores, then vertices in pixels (x0, y0, x1, y1, ...). The
    vertices are decoded in at least float32, so y is promoted to at least float32 (a half head's y is float32).
    """

    def __init__(self, nc: int = 80, np: int = 8, reg_max: int = 16, ch: Sequence[int] = ()):
        super().__init__(nc=nc, reg_max=reg_max, ch=ch)
        if isinstance(np, bool) or not isinstance(np, int) or np < 3:
            raise ValueError(f"Expected an int np >= 3 for vertices per polygon, got np={np!r}")
        self.np = np
        c4 = max(self.ch[0] // 4, 2 * np)
        self.cv4 = nn.ModuleList(
            nn.Sequential(Conv(c, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, 2 * np, 1)) for c in self.ch
        )

    def _branch_outputs(self, x: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**super()._branch_outputs(x), "polygons": self._run(self.cv4, x, 2 * self.np)}

    def decode(self, preds: dict) -> torch.Tensor:
        """Training-style predictions -> (B, 4 + nc + 2*np, A): Detect's boxes and scores, then pixel vertices."""
        detections = super().decode(preds)
        anchors, strides = make_anchors(preds["feats"], self.stride)
        vertices = decode_polygons(preds["polygons"], anchors, strides)
        dtype = torch.promote_types(detections.dtype, vertices.dtype)
        return torch.cat((detections.to(dtype), vertices.to(dtype)), 1)

    def bias_init(self, box_bias: float = 2.0, img_size: float = 640, objects_per_image: float = 5.0) -> None:
        """Detect's bias initialisation, then cv4's final bias = 0 (each vertex starts near its anchor's cell)."""
        super().bias_init(box_bias=box_bias, img_size=img_size, objects_per_image=objects_per_image)
        with torch.no_grad():
            for branch in self.cv4:
                # Bias only: zeroing the weights too puts every vertex on one point at step 0, a stationary point
                # of MGIoU-style losses (R2).
                branch[-1].bias.zero_()
