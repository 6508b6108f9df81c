"""PolygonLoss forward + backward on CPU (batch 8, 640x640, nc 1, np 8, ~10 objects per image), l2 and mgiou modes,
next to DetectionLoss on the same tensors, so the polygon term's own cost is the difference.

Run: python -m pytest benchmarks/test_bench_polygon_loss_cpu.py --benchmark-only \
    --benchmark-columns=min,median,mean,rounds
"""

from __future__ import annotations

import pytest

from benchmarks._inputs import STRIDES, LossShape, clear_grads, make_batch, make_preds
from losses import DetectionLoss, PolygonLoss

SHAPE = LossShape("cpu-640", batch=8, nc=1, img_size=640, objects_per_image=10, np=8)


def _step(criterion, preds, batch):
    vector, _ = criterion(preds, batch)
    vector.sum().backward()


def _criterion(kind: str):
    if kind == "detection":
        return DetectionLoss(SHAPE.nc, STRIDES)
    return PolygonLoss(SHAPE.nc, STRIDES, np=SHAPE.np, mode=kind)


@pytest.mark.benchmark(group="polygon-loss-cpu")
@pytest.mark.parametrize("kind", ["l2", "mgiou", "detection"])
def test_bench_polygon_loss_forward_backward(benchmark, kind):
    preds = make_preds(SHAPE, "cpu", polygons=kind != "detection")
    batch = make_batch(SHAPE, "cpu")
    benchmark.pedantic(
        _step, args=(_criterion(kind), preds, batch), setup=lambda: clear_grads(preds), rounds=15, warmup_rounds=2
    )
