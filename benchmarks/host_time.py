"""Host time against device time of small CUDA calls: where a step that should take microseconds goes.

    python benchmarks/host_time.py [--calls 200]

For each call: `serial` is the median wall time of one call followed by a device sync (what a benchmark sees);
`queued` is the wall time per call of many calls issued back to back, then one sync (the larger of host and device
time per call, so below `serial` when the device overlaps the host); `host` is the time to issue one call without
any sync wait (only meaningful for calls that do not sync themselves).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import losses  # noqa: E402
from losses.mgiou import _check_pair  # noqa: E402
from benchmarks._inputs import make_polygon_pairs  # noqa: E402
from losses._kernels import _triton  # noqa: E402


def _serial(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _queued(fn, calls: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (done - start) / calls * 1e6, (issued - start) / calls * 1e6


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _mgiou_launches(pred: torch.Tensor, target: torch.Tensor):
    """The MGIoU kernel (loss and pred gradient) launched through Triton's JIT, and through `DirectLaunch` (the
    compiled kernel's own launcher: no argument binding, specialisation or cache lookup), as `losses` launches it."""
    loss, grad = torch.empty(pred.shape[0], device="cuda"), torch.empty_like(pred)
    grid, args, kwargs = _triton.mgiou_launch(pred, target, None, None, loss, grad, None)

    def jit_launch():
        _triton._mgiou_kernel.jit[grid](*args, **kwargs)

    def direct_launch():
        _triton._mgiou_kernel[grid](*args, **kwargs)

    return jit_launch, direct_launch


def mgiou_calls(n: int = 100_000, vertices: int = 8) -> dict:
    pred, target = make_polygon_pairs(n, vertices, "cuda")
    pred.requires_grad_()
    detached = pred.detach()
    upstream = torch.ones(n, device="cuda")

    def step():
        pred.grad = None
        losses.mgiou(pred, target).sum().backward()

    def step_on_the_calling_thread():  # the benchmark's step with autograd's device threads off (no hand-off)
        with torch.autograd.set_multithreading_enabled(False):
            step()

    def step_unchecked():
        pred.grad = None
        losses.mgiou(pred, target, check_finite=False).sum().backward()

    leaf = torch.randn(n, vertices, 2, device="cuda", requires_grad=True)

    def engine_round_trip():  # autograd's own cost: a backward through one trivial Function, no kernel of ours
        leaf.grad = None
        _Identity.apply(leaf).sum().backward()

    def engine_round_trip_on_the_calling_thread():  # the same with autograd's device threads off (no hand-off)
        with torch.autograd.set_multithreading_enabled(False):
            engine_round_trip()

    def native_round_trip():  # the same without a Python Function: autograd's C++ nodes only
        leaf.grad = None
        (leaf * 1.0).sum().backward()

    def native_loss_round_trip():  # one row value per pair, its gradient a multiply: what a loss built of torch ops costs
        leaf.grad = None
        (leaf * upstream[:, None, None]).sum((1, 2)).sum().backward()

    jit_launch, direct_launch = _mgiou_launches(detached, target)

    def trivial_forward():  # a Python Function's forward alone, its graph dropped
        _Identity.apply(leaf)

    return {
        "autograd round trip (trivial Function, same shape)": engine_round_trip,
        "autograd round trip (trivial Function, no device thread)": engine_round_trip_on_the_calling_thread,
        "autograd round trip (native ops only)": native_round_trip,
        "autograd round trip (a per-row product, native)": native_loss_round_trip,
        "mgiou fwd+bwd (the benchmark)": step,
        "mgiou fwd+bwd, no device thread": step_on_the_calling_thread,
        "mgiou fwd+bwd, check_finite=False (no sync)": step_unchecked,
        "mgiou fwd": lambda: losses.mgiou(pred, target),
        "mgiou fwd, check_finite=False": lambda: losses.mgiou(pred, target, check_finite=False),
        "problem check: kernel and read": lambda: int(_triton.mgiou_problems(detached, target, None, None)),
        "kernel call, loss only": lambda: _triton.mgiou_forward(detached, target, None, None),
        "kernel call, loss and pred gradient": lambda: _triton.mgiou_forward(detached, target, None, None, True),
        "trivial Function forward alone": trivial_forward,
        "MGIoU kernel launch through Triton's JIT": jit_launch,
        "MGIoU kernel launch, DirectLaunch (as losses launches it)": direct_launch,
        "_check_pair (structural checks)": lambda: _check_pair(pred, target, None, None),
        "torch.empty(n) on the device": lambda: torch.empty(n, device="cuda"),
        "torch.zeros(()) on the device": lambda: torch.zeros((), device="cuda"),
        "one .item() of a 0-d tensor": lambda: upstream[0].item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"{'call':48s} {'serial us':>10s} {'queued us':>10s} {'host us':>9s}")
    for name, fn in mgiou_calls().items():
        for _ in range(20):
            fn()
        serial = _serial(fn, args.calls)
        queued, host = _queued(fn, args.calls)
        print(f"{name:48s} {serial:10.1f} {queued:10.1f} {host:9.1f}", flush=True)


if __name__ == "__main__":
    main()
