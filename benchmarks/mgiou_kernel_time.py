"""Device time of one MGIoU kernel call (the profiler's kernel time, no host time), optionally against another revision.

    python benchmarks/mgiou_kernel_time.py [--against REV_OR_FILE] [--reps 20]

Each row is a shape (pairs x vertices), with or without a target mask and with or without the per-pair gradient.
`--against` loads `losses/_kernels/_triton.py` as it was at a git revision (or a copy of it in a file) into the same
process and times it beside the current kernel on the same tensors, then reports the largest loss and gradient
differences between them.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._inputs import make_polygon_pairs  # noqa: E402
from losses._kernels import _triton  # noqa: E402

# (pairs, vertices, masked): the geometry benchmark's shape, masked, larger, the loss step's size, boxes.
SHAPES = [(100_000, 8, False), (100_000, 8, True), (1_000_000, 8, False), (4_200, 8, False), (100_000, 4, False)]


def kernel_module_at(revision: str):
    """`losses._kernels._triton` as of a git revision or in a file, loaded beside the current one (same package, own
    name)."""
    if Path(revision).is_file():
        source = Path(revision).read_text()
    else:
        source = subprocess.run(["git", "show", f"{revision}:losses/_kernels/_triton.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "_triton_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("losses._kernels._triton_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its relative imports resolve in losses._kernels
    return module


def device_us(call, reps: int) -> float:
    """Mean device time per call of the kernels whose name holds 'mgiou'."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if "mgiou" in e.key) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV_OR_FILE", help="also time the kernel of this git revision or file")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    modules = {"current": _triton}
    if args.against:
        modules[args.against] = kernel_module_at(args.against)
    print("pairs x vertices | mask | gradient | " + " | ".join(f"{name} us" for name in modules))
    for n, v, masked in SHAPES:
        pred, target = make_polygon_pairs(n, v, "cuda")
        target_mask = None
        if masked:
            target_mask = torch.rand(n, v, device="cuda") < 0.8
            target_mask[:, 0] = True
        for grad in (False, True):
            times = [device_us(lambda m=m: m.mgiou_forward(pred, target, None, target_mask, grad, grad), args.reps)
                     for m in modules.values()]
            print(f"{n} x {v} | {'yes' if masked else 'no'} | {'yes' if grad else 'no'} | "
                  + " | ".join(f"{t:.1f}" for t in times))
        if args.against:
            ours, theirs = (m.mgiou_forward(pred, target, None, target_mask, True, True) for m in modules.values())
            print(f"   largest differences: loss {(ours[0] - theirs[0]).abs().max().item():.2e}, gradients "
                  f"{(ours[2] - theirs[2]).abs().max().item():.2e} / {(ours[3] - theirs[3]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
