"""MGIoU forward + backward on CPU: 100k polygon pairs of 8 vertices (fp32).

Run: python -m pytest benchmarks/test_bench_mgiou_cpu.py --benchmark-only --benchmark-columns=min,median,mean,rounds
Under --benchmark-disable (CI) the body runs once on 256 pairs, so the code path stays tested without the cost.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._inputs import N_VERTICES, make_polygon_pairs
from losses import convexity_loss, mgiou

PAIRS = 100_000
PAIRS_WHEN_DISABLED = 256


def _step(pred: torch.Tensor, target: torch.Tensor, convexity: bool) -> None:
    loss = mgiou(pred, target)
    if convexity:
        loss = loss + convexity_loss(pred)
    loss.sum().backward()


@pytest.mark.benchmark(group="mgiou-cpu")
@pytest.mark.parametrize("convexity", [False, True], ids=["mgiou", "mgiou+convexity"])
def test_bench_mgiou_forward_backward(benchmark, convexity):
    n = PAIRS_WHEN_DISABLED if benchmark.disabled else PAIRS
    pred, target = make_polygon_pairs(n, N_VERTICES, "cpu")
    pred.requires_grad_()

    def drop_grad():
        pred.grad = None

    benchmark.extra_info.update(pairs=n, vertices=N_VERTICES, threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(pred, target, convexity), setup=drop_grad, rounds=10, warmup_rounds=1)
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())
