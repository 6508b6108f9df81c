"""Head benchmarks: Detect and Polygon, training forward and forward+backward, yolo11n- and yolo11s-like channels.

CUDA: batch 16 at 640 px, fp32. CPU (CI, --benchmark-disable): batch 1 at 64 px, one call each.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._inputs import DEVICES, STRIDES, head_shape, make_features

heads = pytest.importorskip("heads")


def _build(kind: str, channels, device: str) -> torch.nn.Module:
    head = heads.Detect(nc=80, ch=channels) if kind == "detect" else heads.Polygon(nc=80, np=8, ch=channels)
    head.stride = torch.tensor(STRIDES)
    head.bias_init()
    return head.to(device).train()


def _scalar(preds: dict) -> torch.Tensor:
    """A cheap scalar over every output branch, so backward reaches every parameter."""
    return sum(v.float().mean() for k, v in preds.items() if k != "feats")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", ["n", "s"])
@pytest.mark.parametrize("kind", ["detect", "polygon"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_head(device_bench, device, size, kind, mode):
    shape = head_shape(size, device)
    head = _build(kind, shape.channels, device)
    feats = make_features(shape, device)

    def forward():
        return head(feats)

    def forward_backward():
        _scalar(head(feats)).backward()

    def drop_grads():
        head.zero_grad(set_to_none=True)

    fn = forward if mode == "fwd" else forward_backward
    device_bench(fn, setup=drop_grads, batch=shape.batch, img_size=shape.img_size, channels=list(shape.channels))
    preds = head(feats)
    assert preds["boxes"].shape == (shape.batch, 64, sum((shape.img_size // int(s)) ** 2 for s in STRIDES))
