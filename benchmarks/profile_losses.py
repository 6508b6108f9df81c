"""What bounds a loss step: kernel launches, host syncs and the top kernels, from torch.profiler.

    python benchmarks/profile_losses.py [--steps 5] [--out profile.txt] [--cpu] [--timeline]

For each workload (ours and Ultralytics' at the issue's shapes) it warms up, times 20 fwd+bwd steps with CUDA events
(median), then profiles `--steps` steps and reports per step: kernels launched, CUDA graph launches, host syncs
(`aten::_local_scalar_dense` is every `.item()`/`bool(tensor)`/`int(tensor)`; `aten::nonzero` syncs for its
output size), and the top kernels by device time. `--cpu` runs the tiny CPU shapes (operator counts only).
`--timeline` adds, for one profiled step, where the device waited on the host: its busy time against the step's
wall time, and each idle gap of at least 10 us with the host ops that ran during it (from the profiler's trace).
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._inputs import REG_MAX, STRIDES, clear_grads, loss_shape, make_batch, make_preds  # noqa: E402

LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def build_criterion(kind: str, nc: int, np: int, device: str, options: dict):
    """The loss of a workload kind ("detection", "polygon-<mode>", "ultralytics") with `options` it accepts."""
    if kind == "ultralytics":
        from headguard.adapters.ultralytics import v8_detection_loss

        return v8_detection_loss(nc, STRIDES, REG_MAX, device=device)
    import losses

    cls = losses.DetectionLoss if kind == "detection" else losses.PolygonLoss
    kwargs = {"reg_max": REG_MAX}
    if kind != "detection":
        kwargs.update(np=np, mode=kind.split("-", 1)[1])
    accepted = inspect.signature(cls).parameters
    kwargs.update({k: v for k, v in options.items() if k in accepted})
    return cls(nc, STRIDES, **kwargs)


def mgiou_workload(device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """`losses.mgiou` forward+backward on 100,000 pairs of 8 vertices (64 on the CPU), as the geometry benchmark."""
    import losses
    from benchmarks._inputs import N_VERTICES, make_polygon_pairs

    pred, target = make_polygon_pairs(100_000 if device == "cuda" else 64, N_VERTICES, device)
    pred.requires_grad_()

    def step() -> None:
        losses.mgiou(pred, target).sum().backward()

    def setup() -> None:
        pred.grad = None

    return step, setup


def workload(kind: str, shape_name: str, device: str, options: dict) -> tuple[Callable[[], None], Callable[[], None]]:
    if kind == "mgiou":
        return mgiou_workload(device)
    shape = loss_shape(shape_name, device)
    criterion = build_criterion(kind, shape.nc, shape.np, device, options)
    preds = make_preds(shape, device, polygons=True)
    batch = make_batch(shape, device, polygons=True)

    def step() -> None:
        loss, _ = criterion(preds, batch)
        loss.sum().backward()

    return step, lambda: clear_grads(preds)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(step, setup, device: str, n: int = 20) -> float:
    times = []
    for _ in range(n):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _device_time(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_one(name: str, step, setup, device: str, steps: int, top: int = 8, ops: bool = False) -> str:
    for _ in range(5):
        setup()
        step()
    _sync(device)
    ms = median_ms(step, setup, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            setup()
            step()
        _sync(device)
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    launches = sum(count.get(k, 0) for k in LAUNCH_NAMES) / steps
    graphs = count.get("cudaGraphLaunch", 0) / steps
    syncs = {k: count.get(k, 0) / steps for k in SYNC_OPS if count.get(k, 0)}
    aten_ops = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    lines = [
        f"== {name}: median {ms:.2f} ms/step; per step: {launches:.0f} kernel launches, {graphs:.0f} graph launches, "
        f"{aten_ops:.0f} aten ops, syncs {syncs or 'none'}"
    ]
    kernels = [
        e for e in events if device == "cuda" and _device_time(e) > 0 and not e.key.startswith(("aten::", "cuda"))
    ]
    kernels.sort(key=_device_time, reverse=True)
    total = sum(_device_time(e) for e in kernels) / steps
    if kernels:
        lines.append(f"   device time of all kernels {total / 1e3:.2f} ms/step; top kernels (us/step, calls/step):")
    for e in kernels[:top]:
        lines.append(f"   {_device_time(e) / steps:8.1f}  {e.count / steps:5.0f}  {e.key[:100]}")
    if ops:
        aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.count, reverse=True)
        lines.append("   host ops by calls/step (self CPU us/step): " + ", ".join(
            f"{e.key[6:]} {e.count / steps:.0f} ({e.self_cpu_time_total / steps:.0f})" for e in aten[:top]))
    return "\n".join(lines)

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
MIN_GAP_US = 10.0


def _busy_intervals(device_events: list[dict]) -> list[tuple[float, float]]:
    """The union of the device events' [start, end) intervals (us), in order."""
    merged: list[list[float]] = []
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in device_events):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def timeline(trace: dict, top: int = 4) -> list[str]:
    """Device busy time, the step's wall time and the device's idle gaps (with the host ops running in each) of a
    chrome trace of one step (torch.profiler's export)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    if not device or not host:
        return ["   timeline: no device events in the trace"]
    busy = _busy_intervals(device)
    start = min(e["ts"] for e in host)
    end = max(busy[-1][1], max(e["ts"] + e["dur"] for e in host))
    lines = [f"   timeline of one step: wall {end - start:.0f} us, device busy {sum(e - s for s, e in busy):.0f} us; "
             f"idle gaps >= {MIN_GAP_US:.0f} us (offset, length: host ops running then, longest first):"]
    edges = [(start, busy[0][0])] + [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)] + [(busy[-1][1], end)]
    for gap_start, gap_end in edges:
        if gap_end - gap_start < MIN_GAP_US:
            continue
        during = [e for e in host if e["ts"] < gap_end and e["ts"] + e["dur"] > gap_start]
        during.sort(key=lambda e: min(e["ts"] + e["dur"], gap_end) - max(e["ts"], gap_start), reverse=True)
        names = ", ".join(dict.fromkeys(e["name"][:40] for e in during))
        names = ", ".join(names.split(", ")[:top])
        lines.append(f"   {gap_start - start:8.0f} {gap_end - gap_start:7.0f}  {names}")
    return lines


def trace_one_step(step, setup) -> dict:
    """A chrome trace (as a dict) of one profiled step."""
    setup()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu", action="store_true", help="tiny CPU shapes: operator counts, no kernels")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=BOOL",
                        help="loss constructor option for ours, e.g. cuda_graphs=1 (ignored where not accepted)")
    parser.add_argument("--top", type=int, default=8, help="kernels (and with --ops, host ops) listed per workload")
    parser.add_argument("--ops", action="store_true", help="also list the aten ops issued per step, by count")
    parser.add_argument("--timeline", action="store_true", help="also the device's idle gaps in one step (CUDA)")
    parser.add_argument("--only", default="", help="comma-separated substrings of workload names to keep")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    options = {k: bool(int(v)) for k, v in (o.split("=", 1) for o in args.option)}
    names = [("ultralytics", "a"), ("ultralytics", "b"), ("detection", "a"), ("detection", "b"),
             ("polygon-l2", "a"), ("polygon-mgiou", "a"), ("mgiou", "100k x 8")]
    report = [f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
              f"options {options or 'none'}"]
    for kind, shape in names:
        label = f"{kind} ({shape})"
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        try:
            step, setup = workload(kind, shape, device, options)
            report.append(profile_one(label, step, setup, device, args.steps, args.top, args.ops))
            if args.timeline and device == "cuda":
                report[-1] += "\n" + "\n".join(timeline(trace_one_step(step, setup)))
        except Exception as exc:  # one broken workload must not hide the others' profiles
            report.append(f"== {label}: failed: {type(exc).__name__}: {exc}")
        print(report[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
