"""Device time of the assignment's kernels at the loss shapes (a) and (b), per block configuration.

    python benchmarks/assign_kernel_time.py [--reps 20] [--against REV_OR_FILE]

On the benchmark's assigner inputs (gt slots padded as the fast path pads them): the metrics kernel per gt block
size, the top-k kernel per warp cap beside torch's top-k, and the positives pass; with `--against`, the metrics and
positives kernels of another revision (or file) too. Device time per call from the profiler, no host time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._inputs import STRIDES, loss_shape, make_assigner_inputs  # noqa: E402
from benchmarks._kernel_timing import device_us, kernel_module_at  # noqa: E402
from losses._fast import padded_slot_count  # noqa: E402
from losses._kernels import _triton  # noqa: E402
from losses.assigner import AssignerConfig  # noqa: E402

METRIC_BLOCKS_N = (2, 4, 8, 16)
TOP_MAX_WARPS = (8, 16, 32)


def padded_inputs(shape_name: str, device: str = "cuda") -> tuple:
    """The metric kernel's arguments at a loss shape, with the gt slots padded to the fast path's slot count."""
    x = make_assigner_inputs(loss_shape(shape_name, device), device)
    n = x["gt_bboxes"].shape[1]
    pad = padded_slot_count(n) - n

    def padded(t):
        return torch.cat((t, t.new_zeros((t.shape[0], pad, *t.shape[2:]))), 1)

    cfg = AssignerConfig()
    return (x["pd_scores"], x["pd_bboxes"], x["anchor_points"], padded(x["gt_labels"]).long().squeeze(-1),
            padded(x["gt_bboxes"]), padded(x["mask_gt"]).bool().squeeze(-1), float(STRIDES[1]), cfg.alpha,
            cfg.beta), cfg.topk


def with_constant(module, name: str, value, call):
    """`call()` with module.name set to value (restored after)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        return call()
    finally:
        setattr(module, name, old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--against", metavar="REV_OR_FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    for shape_name in ("a", "b"):
        metric_args, topk = padded_inputs(shape_name)
        b, n = metric_args[3].shape
        print(f"shape ({shape_name}): B {b}, gt slots {n}, anchors {metric_args[2].shape[0]}")
        candidate, overlaps, align = _triton.assign_metrics(*metric_args)
        mask_gt = metric_args[5]
        for block_n in METRIC_BLOCKS_N:
            us = with_constant(_triton, "_PAIR_BLOCK_N", block_n, lambda: device_us(
                lambda: _triton.assign_metrics(*metric_args), args.reps, "assign_metrics"))
            print(f"   metrics kernel, {block_n} gts per tile: {us:.1f} us")
        print(f"   torch.topk (unsorted): {device_us(lambda: align.topk(topk, dim=-1, sorted=False), args.reps):.1f} us")
        for warps in TOP_MAX_WARPS:
            us = with_constant(_triton, "_TOP_MAX_WARPS", warps, lambda: device_us(
                lambda: _triton.top_indices(align, mask_gt, topk), args.reps, "top_indices"))
            print(f"   top-k kernel, at most {warps} warps: {us:.1f} us")
        us = device_us(lambda: _triton.assign_positives(align, overlaps, candidate, mask_gt, topk), args.reps,
                       "assign_positives")
        print(f"   positives pass: {us:.1f} us")
        if args.against:
            other = kernel_module_at(args.against)
            us = device_us(lambda: other.assign_metrics(*metric_args), args.reps, "assign_metrics")
            print(f"   {args.against}: metrics kernel {us:.1f} us")


if __name__ == "__main__":
    main()
