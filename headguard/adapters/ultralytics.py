"""Ultralytics' own detection loss as a headguard loss factory (also the oracle of our tests and benchmarks).

    from headguard import HeadSpec
    from headguard.adapters.ultralytics import detection_loss
    SPEC = HeadSpec(head=MyForkDetect, loss=detection_loss)      # check a fork's head with v8DetectionLoss

`v8DetectionLoss(model)` reads only `model.args` (box/cls/dfl gains), `model.model[-1]` (a Detect-like module with
`stride`, `nc`, `reg_max`) and the device of `next(model.parameters())`; the stand-in below offers exactly that, so no
Ultralytics model has to be built. Importing this module needs `ultralytics` installed (the `test` extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import nn

# Ultralytics' default gains; our DetectionGains default to the same values.
DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class _DetectAttributes(nn.Module):
    """The attributes v8DetectionLoss reads from the last module: stride (a plain tensor), nc, reg_max."""

    def __init__(self, nc: int, reg_max: int, strides: Sequence[float], device: torch.device):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.stride = torch.tensor([float(s) for s in strides], dtype=torch.float32)
        # One frozen parameter, so that next(model.parameters()) names the device the criterion must live on.
        self.device_marker = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


class _StandInModel(nn.Module):
    def __init__(self, nc, reg_max, strides, device, gains: Mapping[str, float]):
        super().__init__()
        self.args = SimpleNamespace(**{**DEFAULT_GAINS, **gains})
        self.model = nn.ModuleList([_DetectAttributes(nc, reg_max, strides, torch.device(device))])


def v8_detection_loss(
    nc: int, strides: Sequence[float], reg_max: int = 16, *, device="cpu", gains: Mapping[str, float] | None = None
):
    """Ultralytics' v8DetectionLoss for these settings (its defaults: top-k 10, alpha 0.5, beta 6)."""
    from ultralytics.utils.loss import v8DetectionLoss

    strides = strides.tolist() if isinstance(strides, torch.Tensor) else list(strides)
    return v8DetectionLoss(_StandInModel(nc, reg_max, strides, device, gains or {}))


def detection_loss(head: nn.Module):
    """A `HeadSpec(loss=...)` factory: v8DetectionLoss for the head's nc, stride and reg_max, on its device."""
    device = next(head.parameters()).device
    return v8_detection_loss(int(head.nc), head.stride, int(head.reg_max), device=device)


__all__ = ["DEFAULT_GAINS", "detection_loss", "v8_detection_loss"]
