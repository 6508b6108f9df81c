"""Build Ultralytics' v8DetectionLoss side by side with ours, from the same nc, reg_max, strides and gains.

v8DetectionLoss(model) reads `model.args` (box/cls/dfl gains), `model.model[-1]` (a Detect-like module with
`stride`, `nc`, `reg_max`) and `next(model.parameters()).device`. The stand-in below offers exactly that and nothing
else, so no Ultralytics model has to be built. Import this module only after `pytest.importorskip("ultralytics")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

# Ultralytics' default gains, which our DetectionGains default to as well.
DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class _DetectLike(nn.Module):
    """The attributes v8DetectionLoss reads from the last module: stride (a plain tensor), nc, reg_max."""

    def __init__(self, nc: int, reg_max: int, strides: Sequence[float], device: torch.device):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.stride = torch.tensor(list(strides), dtype=torch.float32)
        # One parameter so that next(model.parameters()) names the device the criterion must live on.
        self.anchor = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


class StandInModel(nn.Module):
    """A model object with `args`, `model[-1]` and one parameter on `device`: all v8DetectionLoss needs."""

    def __init__(self, nc: int, reg_max: int, strides: Sequence[float], device, gains: dict | None = None):
        super().__init__()
        self.args = SimpleNamespace(**(gains or DEFAULT_GAINS))
        self.model = nn.ModuleList([_DetectLike(nc, reg_max, strides, torch.device(device))])


def ultralytics_detection_loss(nc: int, reg_max: int, strides: Sequence[float], device, gains: dict | None = None):
    """Ultralytics' v8DetectionLoss for these settings (default top-k 10, alpha 0.5, beta 6)."""
    from ultralytics.utils.loss import v8DetectionLoss

    return v8DetectionLoss(StandInModel(nc, reg_max, strides, device, gains))
