"""Builds Ultralytics 8.4 objects (the oracle) for comparison with our reference head and loss."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

ultralytics = pytest.importorskip("ultralytics")
from ultralytics.nn.modules.head import Detect as UltralyticsDetect  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402

__all__ = ["UltralyticsDetect", "randomise_", "ultralytics_detection_loss"]


def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BatchNorm buffer random values, so a layout mistake cannot hide behind defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


class _StandIn(nn.Module):
    """The three things v8DetectionLoss reads from a model: `args` gains, `model[-1]` (Detect) and its parameters."""

    def __init__(self, detect: nn.Module, box: float, cls: float, dfl: float):
        super().__init__()
        self.model = nn.ModuleList([detect])
        self.args = types.SimpleNamespace(box=box, cls=cls, dfl=dfl)


def ultralytics_detection_loss(
    nc: int, strides, reg_max: int = 16, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5
) -> v8DetectionLoss:
    """v8DetectionLoss for a one-channel stand-in Detect with the given nc, strides and reg_max."""
    detect = UltralyticsDetect(nc=nc, reg_max=reg_max, ch=(1,) * len(strides))
    detect.stride = torch.as_tensor(strides, dtype=torch.float32)
    return v8DetectionLoss(_StandIn(detect, box, cls, dfl))
