"""Reference Detect head: Ultralytics 8.4 layout (same module names, widths and state-dict keys)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._blocks import DFL, Conv, DWConv
from ._decode import dist2bbox, make_anchors


class Detect(nn.Module):
    """Anchor-free detection head with a DFL box branch (`cv2`) and a class branch (`cv3`) per level.

    Training forward: {"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": list of the inputs}.
    Eval forward: (y, preds) with y (B, 4+nc, A): xywh boxes in pixels, then sigmoid class scores.
    `stride` is a plain tensor attribute (not a buffer, as in Ultralytics); set it before `bias_init()` or eval.
    """

    def __init__(self, nc: int = 80, reg_max: int = 16, ch: Sequence[int] = ()):
        super().__init__()
        if not _is_int(nc) or nc < 1:
            raise ValueError(f"Expected a positive int for nc, got nc={nc!r}")
        if not _is_int(reg_max) or reg_max < 1:
            raise ValueError(f"Expected a positive int for reg_max, got reg_max={reg_max!r}")
        if len(ch) == 0 or not all(_is_int(c) and c > 0 for c in ch):
            raise ValueError(f"Expected ch to be a non-empty sequence of positive ints (one per level), got ch={ch!r}")
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        self.ch = tuple(ch)
        self.stride = torch.zeros(self.nl)
        c2 = max(16, ch[0] // 4, 4 * reg_max)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(DWConv(c, c, 3), Conv(c, c3, 1)),
                nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                nn.Conv2d(c3, nc, 1),
            )
            for c in ch
        )
        self.dfl = DFL(reg_max) if reg_max > 1 else nn.Identity()

    def forward(self, x: Sequence[torch.Tensor]):
        self._check_inputs(x)
        preds = {**self._branch_outputs(x), "feats": list(x)}
        if self.training:
            return preds
        return self.decode(preds), preds

    def _branch_outputs(self, x: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each branch's output, levels concatenated: what subclasses extend with their own branches."""
        return {"boxes": self._run(self.cv2, x, 4 * self.reg_max), "scores": self._run(self.cv3, x, self.nc)}

    def _run(self, branches: nn.ModuleList, x: Sequence[torch.Tensor], channels: int) -> torch.Tensor:
        """(B, channels, A): branch i applied to level i, flattened and concatenated over levels."""
        b = x[0].shape[0]
        return torch.cat([branches[i](x[i]).view(b, channels, -1) for i in range(self.nl)], -1)

    def decode(self, preds: dict) -> torch.Tensor:
        """Training-style predictions -> (B, 4+nc, A): xywh boxes in pixels, then sigmoid scores."""
        self._require_strides("decoding")
        anchors, strides = make_anchors(preds["feats"], self.stride)
        dist = self.dfl(preds["boxes"])
        boxes = dist2bbox(dist, anchors.t().unsqueeze(0), xywh=True, dim=1) * strides.t()
        return torch.cat((boxes, preds["scores"].sigmoid()), 1)

    def class_prior(self, level: int, img_size: float = 640, objects_per_image: float = 5.0) -> float:
        """Prior p of one class at one anchor of `level`: objects_per_image / nc / (img_size / stride)^2.

        `bias_init` sets the class bias to log(p), so sigmoid(bias) = p / (1 + p), which is p to first order.
        """
        self._require_strides("class_prior()")
        cells = (img_size / float(self.stride[level])) ** 2
        return objects_per_image / self.nc / cells

    def bias_init(self, box_bias: float = 2.0, img_size: float = 640, objects_per_image: float = 5.0) -> None:
        """Set every final conv's bias: box logits to `box_bias`, class logits to log(class_prior(level))."""
        self._require_strides("bias_init()")
        with torch.no_grad():
            for level, (box_branch, cls_branch) in enumerate(zip(self.cv2, self.cv3)):
                box_branch[-1].bias.fill_(box_bias)
                cls_branch[-1].bias[: self.nc] = math.log(self.class_prior(level, img_size, objects_per_image))

    def _require_strides(self, what: str) -> None:
        if self.stride.numel() != self.nl or not bool((self.stride > 0).all()):
            raise ValueError(
                f"strides are unset or invalid for {what}: got head.stride={self.stride.tolist()}; "
                f"set head.stride (one positive value per level, {self.nl} levels) before calling {what}"
            )

    def _check_inputs(self, x: Sequence[torch.Tensor]) -> None:
        if not isinstance(x, (list, tuple)) or len(x) != self.nl:
            found = f"{len(x)} levels" if isinstance(x, (list, tuple)) else f"a {type(x).__name__}"
            raise ValueError(f"Detect.forward got {found}; expected a list of {self.nl} feature maps (B, C, H, W)")
        for i, (feat, c) in enumerate(zip(x, self.ch)):
            if not isinstance(feat, torch.Tensor) or feat.ndim != 4:
                shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
                raise ValueError(f"Detect.forward: x[{i}] has shape {shape}; expected a 4-D (B, C, H, W) tensor")
            if feat.shape[1] != c:
                raise ValueError(f"Detect.forward: x[{i}] has {feat.shape[1]} channels; expected ch[{i}] = {c}")
            if feat.shape[0] != x[0].shape[0]:
                raise ValueError(
                    f"Detect.forward: x[{i}] has batch size {feat.shape[0]}; expected {x[0].shape[0]} as in x[0]"
                )


def _is_int(value) -> bool:
    """An int that is not a bool (True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
