"""Device time of one MGIoU kernel call (the profiler's kernel time, no host time), optionally against another revision.

    python benchmarks/mgiou_kernel_time.py [--against REV_OR_FILE ...] [--reps 20]

Each row is a shape (pairs x vertices), with or without a target mask and with or without the per-pair gradient.
`--against` (repeatable) loads `losses/_kernels/_triton.py` as it was at a git revision (or a copy of it in a file)
into the same process and times it beside the current kernel on the same tensors, then reports the largest loss and
gradient differences from the current one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._inputs import make_polygon_pairs  # noqa: E402
from benchmarks._kernel_timing import device_us, kernel_module_at  # noqa: E402
from losses._kernels import _triton  # noqa: E402

# (pairs, vertices, masked): the geometry benchmark's shape, masked, larger, the loss step's size, boxes.
SHAPES = [(100_000, 8, False), (100_000, 8, True), (1_000_000, 8, False), (4_200, 8, False), (100_000, 4, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV_OR_FILE", action="append", default=[],
                        help="also time the kernel of this git revision or file (repeatable)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    modules = {"current": _triton}
    for other in args.against:
        modules[other] = kernel_module_at(other)
    print("pairs x vertices | mask | gradient | " + " | ".join(f"{name} us" for name in modules))
    for n, v, masked in SHAPES:
        pred, target = make_polygon_pairs(n, v, "cuda")
        target_mask = None
        if masked:
            target_mask = torch.rand(n, v, device="cuda") < 0.8
            target_mask[:, 0] = True
        for grad in (False, True):
            times = [device_us(lambda m=m: m.mgiou_forward(pred, target, None, target_mask, grad, grad), args.reps,
                               "mgiou")
                     for m in modules.values()]
            print(f"{n} x {v} | {'yes' if masked else 'no'} | {'yes' if grad else 'no'} | "
                  + " | ".join(f"{t:.1f}" for t in times))
        ours = _triton.mgiou_forward(pred, target, None, target_mask, True, True)
        for other in args.against:
            theirs = modules[other].mgiou_forward(pred, target, None, target_mask, True, True)
            # (loss, [problems,] pred gradient, target gradient): revisions before 2026-12-04 returned the problems
            print(f"   largest differences from {other}: loss {(ours[0] - theirs[0]).abs().max().item():.2e}, "
                  f"gradients {(ours[-2] - theirs[-2]).abs().max().item():.2e} / "
                  f"{(ours[-1] - theirs[-1]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
