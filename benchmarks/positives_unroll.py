"""The assignment's positives pass (`losses._kernels._triton.assign_positives`) at the loss shapes, for several gt
unroll factors, against the torch spec it replaces: GPU time per call (CUDA events, median of 50).

    python benchmarks/positives_unroll.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._inputs import STRIDES, loss_shape, make_assigner_inputs  # noqa: E402
from losses._kernels import _triton, spec  # noqa: E402


def _gpu_ms(fn, rounds: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    print(f"device: {torch.cuda.get_device_name(0)}")
    for name in ("a", "b"):
        inputs = make_assigner_inputs(loss_shape(name, "cuda"), "cuda")
        labels = inputs["gt_labels"].long().squeeze(-1)
        mask_gt = inputs["mask_gt"].bool()
        candidate, overlaps, align = spec.assign_metrics(
            inputs["pd_scores"], inputs["pd_bboxes"], inputs["anchor_points"], labels, inputs["gt_bboxes"],
            mask_gt.squeeze(-1), STRIDES[1], 0.5, 6.0)
        args = (align, overlaps, candidate, mask_gt, 10)
        want = spec.assign_positives(*args)
        row = [f"shape {name} (B, n, A) = {tuple(align.shape)}: spec {_gpu_ms(lambda: spec.assign_positives(*args)):.3f} ms"]
        for unroll in (1, 4, 8, 16):
            got = _triton.assign_positives(*args, unroll=unroll)
            same = all(torch.equal(x, y) for x, y in zip(got, want))
            row.append(f"unroll {unroll} {_gpu_ms(lambda: _triton.assign_positives(*args, unroll=unroll)):.3f} ms"
                       f"{'' if same else ' (DIFFERS)'}")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
