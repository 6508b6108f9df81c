"""Anchor generation and box/polygon decoding: pure functions, no cached state."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

# decode_polygons computes in float32 at least (float64 stays float64), so it is finite for |raw| <= DECODE_RAW_BOUND
# in every input dtype whenever anchors (grid units) and strides (pixels) are <= 1e6: the result is at most
# (2e30 + 1e6) * 1e6 ~ 2e36 < 3.4e38 = float32 max. fp16 raw (|raw| <= 65504) is always within the bound; bf16 and
# fp32 raw beyond it may decode to inf, visibly: nothing is clamped.
DECODE_RAW_BOUND = 1e30


def make_anchors(
    feats: Sequence[torch.Tensor], strides: torch.Tensor | Sequence[float], offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre anchors for each level, in grid units of that level.

    Returns anchor_points (A, 2) as (x, y) and stride_tensor (A, 1), levels concatenated in order, row-major within a
    level; dtype and device follow feats[0].
    """
    if len(feats) != len(strides):
        raise ValueError(f"make_anchors got {len(feats)} feature maps but {len(strides)} strides; expected one each")
    ref = feats[0]
    points, stride_rows = [], []
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        xs = torch.arange(w, dtype=ref.dtype, device=ref.device) + offset
        ys = torch.arange(h, dtype=ref.dtype, device=ref.device) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2))
        stride_rows.append(torch.full((h * w, 1), float(stride), dtype=ref.dtype, device=ref.device))
    return torch.cat(points), torch.cat(stride_rows)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True, dim: int = -1) -> torch.Tensor:
    """(left, top, right, bottom) distances from anchor points -> boxes, xywh or xyxy, along `dim`."""
    lt, rb = distance.chunk(2, dim)
    top_left = anchor_points - lt
    bottom_right = anchor_points + rb
    if xywh:
        return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim)
    return torch.cat((top_left, bottom_right), dim)


class _SoftmaxExpectation(torch.autograd.Function):
    """E[bin] under softmax(logits) over dim 2 of (B, 4, R, A), with the analytic gradient p_i * (bin_i - E) * g.

    Autograd's softmax backward over a non-last dim plus the product's backward cost about 4x this on CPU.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(2)
        expectation = (probs * bins).sum(2)
        ctx.save_for_backward(probs, bins, expectation)
        return expectation

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        probs, bins, expectation = ctx.saved_tensors
        grad_logits = (bins - expectation.unsqueeze(2)).mul_(probs).mul_(grad.unsqueeze(2))
        return grad_logits, None


def dfl_expectation(boxes: torch.Tensor, reg_max: int | None = None) -> torch.Tensor:
    """(B, 4*reg_max, A) bin logits -> (B, 4, A) expected distance in bins (softmax expectation over bins 0..reg_max-1).

    Differentiable once (analytic gradient); the softmax runs in the head's layout, so nothing is permuted or copied.
    """
    b, c, a = boxes.shape
    reg_max = c // 4 if reg_max is None else reg_max
    if c != 4 * reg_max:
        raise ValueError(f"dfl_expectation got {c} channels; expected 4 * reg_max = {4 * reg_max}")
    bins = torch.arange(reg_max, dtype=boxes.dtype, device=boxes.device).view(reg_max, 1)
    return _SoftmaxExpectation.apply(boxes.view(b, 4, reg_max, a), bins)


def decode_polygons(raw: torch.Tensor, anchor_points: torch.Tensor, stride_tensor: torch.Tensor) -> torch.Tensor:
    """(B, 2*np, A) raw vertex offsets -> pixels: (2*raw + anchor - 0.5) * stride, computed in at least fp32.

    fp16/bf16 inputs are decoded in fp32 (raw of about 1,000 at stride 32 overflows fp16) and the result is fp32.
    """
    dtype = torch.promote_types(raw.dtype, torch.float32)
    b, c, a = raw.shape
    if c % 2:
        raise ValueError(f"decode_polygons got {c} channels; expected an even count 2*np (x, y per vertex)")
    xy = raw.to(dtype).reshape(b, c // 2, 2, a)
    anchors = anchor_points.to(dtype).t().reshape(1, 1, 2, a)
    strides = stride_tensor.to(dtype).reshape(1, 1, 1, a)
    return ((2 * xy + anchors - 0.5) * strides).view(b, c, a)
