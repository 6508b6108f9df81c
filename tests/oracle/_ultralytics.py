"""Builds Ultralytics 8.4 objects (the oracle) for comparison with our reference head and loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

ultralytics = pytest.importorskip("ultralytics")
from ultralytics.nn.modules.head import Detect as UltralyticsDetect  # noqa: E402

__all__ = ["UltralyticsDetect", "randomise_"]


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
