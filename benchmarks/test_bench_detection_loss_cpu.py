"""DetectionLoss vs Ultralytics' v8DetectionLoss, forward + backward on CPU (batch 8, 640x640, nc 1, ~10 objects).

Run: python -m pytest benchmarks/test_bench_detection_loss_cpu.py --benchmark-only \
    --benchmark-columns=min,median,mean,rounds
"""

from __future__ import annotations

import pytest
import torch

from losses import DetectionLoss

ultralytics = pytest.importorskip("ultralytics")
from headguard.adapters.ultralytics import v8_detection_loss  # noqa: E402

STRIDES = (8.0, 16.0, 32.0)
BATCH, SIZE, NC, OBJECTS = 8, 640, 1, 10


def _inputs():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.zeros(BATCH, 1, SIZE // int(s), SIZE // int(s)) for s in STRIDES]
    anchors = sum(f.shape[2] * f.shape[3] for f in feats)
    boxes = (torch.randn(BATCH, 64, anchors, generator=gen) * 2).requires_grad_()
    scores = (torch.randn(BATCH, NC, anchors, generator=gen) - 4).requires_grad_()
    n = BATCH * OBJECTS
    batch = {
        "batch_idx": torch.arange(BATCH).repeat_interleave(OBJECTS).float(),
        "cls": torch.zeros(n, 1),
        "bboxes": torch.cat((torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.3 + 0.02), 1),
    }
    return {"boxes": boxes, "scores": scores, "feats": feats}, batch


def _step(criterion, preds, batch):
    vec, _ = criterion(preds, batch)
    vec.sum().backward()
    preds["boxes"].grad = preds["scores"].grad = None


@pytest.mark.benchmark(group="detection-loss-cpu")
def test_bench_headguard_detection_loss(benchmark):
    torch.set_num_threads(torch.get_num_threads())
    preds, batch = _inputs()
    benchmark.pedantic(_step, args=(DetectionLoss(NC, STRIDES), preds, batch), rounds=20, warmup_rounds=2)


@pytest.mark.benchmark(group="detection-loss-cpu")
def test_bench_ultralytics_v8_detection_loss(benchmark):
    preds, batch = _inputs()
    benchmark.pedantic(_step, args=(v8_detection_loss(NC, STRIDES), preds, batch), rounds=20, warmup_rounds=2)
