"""Building blocks with Ultralytics' attribute names, so state dicts match key for key."""

from __future__ import annotations

import math

import torch
from torch import nn


def autopad(k: int | list[int], p: int | list[int] | None = None, d: int = 1) -> int | list[int]:
    """Padding that keeps the spatial size for stride 1 ("same"), given kernel `k` and dilation `d`."""
    if p is not None:
        return p
    effective = [d * (x - 1) + 1 for x in k] if isinstance(k, (list, tuple)) else d * (k - 1) + 1
    return [x // 2 for x in effective] if isinstance(effective, list) else effective // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU; attributes `conv`, `bn`, `act`."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g=1, d=1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(Conv):
    """Depth-wise Conv: groups = gcd(c1, c2)."""

    def __init__(self, c1: int, c2: int, k=1, s=1, d=1, act: bool | nn.Module = True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class DFL(nn.Module):
    """Expected value of a softmax over `c1` bins, per box side; `conv` holds the frozen bin values 0..c1-1."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4*c1, A) logits -> (B, 4, A) expected distances in bins."""
        b, _, a = x.shape
        probs = x.view(b, 4, self.c1, a).softmax(2)
        # The bin values come from `conv` (not a fresh arange) so a loaded state dict is honoured.
        return torch.einsum("bsca,c->bsa", probs, self.conv.weight.view(self.c1).to(probs.dtype))
