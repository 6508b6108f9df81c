"""Where the wall time of one fast-path loss step goes, host against device, without the profiler's overhead.

    python benchmarks/step_timeline.py [--rounds 50] [--only "detection (a)"] [--host-profile 200] [--calling-thread]

Each step (the benchmark's: the default loss, `.sum().backward()`, then a device sync) is cut into phases at
points in the fast path. At each point the host's clock is read and a CUDA event recorded, so for every phase
we know when the host reached its end (host us, from the step's start) and when the device finished everything
queued up to it (device us). Medians over the rounds. A phase whose device time equals the host time of the
phase after it means the device sat idle waiting for the host there; the step is host-bound where the host line
is the longer. The events themselves cost a few microseconds of host time each. Points are listed in the order the
step reaches them (after the first call the forward graph is queued before the status is read).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._inputs import clear_grads, loss_shape, make_batch, make_preds  # noqa: E402
from benchmarks.profile_losses import build_criterion  # noqa: E402
from losses import _fast, _graphs  # noqa: E402

WORKLOADS = {"detection (a)": ("detection", "a"), "detection (b)": ("detection", "b"),
             "polygon-l2 (a)": ("polygon-l2", "a"), "polygon-mgiou (a)": ("polygon-mgiou", "a")}


class Marks:
    """Host times and CUDA events at named points of one step."""

    def __init__(self):
        self.names: list[str] = []
        self.host: list[float] = []
        self.events: list[torch.cuda.Event] = []

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.names.append(name)
        self.host.append(time.perf_counter())
        self.events.append(event)

    def offsets(self) -> tuple[list[float], list[float]]:
        """(host us, device us) of each point after the first, from the first."""
        host = [(t - self.host[0]) * 1e6 for t in self.host[1:]]
        device = [self.events[0].elapsed_time(e) * 1e3 for e in self.events[1:]]
        return host, device


@contextmanager
def marked(marks_of_step, owner, name: str, label: str, on_entry: bool = False):
    """Wrap owner.name so each call marks `label` when it returns (or, `on_entry`, when it is entered)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if on_entry:
            marks_of_step().mark(label)
        out = original(*args, **kwargs)
        if not on_entry:
            marks_of_step().mark(label)
        return out

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def workload(kind: str, shape_name: str):
    """The default loss of `kind` (as a user builds it: no flags) and the benchmark's inputs at the shape."""
    shape = loss_shape(shape_name, "cuda")
    polygons = kind != "detection"
    criterion = build_criterion(kind, shape.nc, shape.np, "cuda", {})
    return criterion, make_preds(shape, "cuda", polygons=polygons), make_batch(shape, "cuda", polygons=polygons)


def timeline(kind: str, shape_name: str, rounds: int, calling_thread: bool = False) -> list[tuple[str, float, float]]:
    """Median (point, host us, device us) over `rounds` steps; `calling_thread`: autograd's backward runs on the
    calling thread (its device threads off), to see what handing the backward to them costs."""
    criterion, preds, batch = workload(kind, shape_name)
    current = [Marks()]
    points = [
        (_fast.FastPath, "_prepare_graphed", "copies + checks graph queued", False),
        (_fast.GraphedCore, "__call__", "forward graph queued", False),
        (_fast.FastPath, "_settle", "status read (the one sync)", False),
        # The backward of the replayed core, called by autograd's engine (on its device thread for CUDA).
        (_graphs._Replay, "backward", "core's backward entered", True),
        (_graphs._Replay, "backward", "core's backward left", False),
    ]
    samples = []
    with ExitStack() as stack:
        for point in points:
            stack.enter_context(marked(lambda: current[0], *point))
        for i in range(rounds + 10):
            clear_grads(preds)
            torch.cuda.synchronize()
            marks = current[0] = Marks()
            marks.mark("start")
            loss, _ = criterion(preds, batch)
            marks.mark("loss returned")
            with torch.autograd.set_multithreading_enabled(not calling_thread):
                loss.sum().backward()
            marks.mark("backward queued")
            torch.cuda.synchronize()
            marks.mark("synchronised")
            torch.cuda.synchronize()
            if i >= 10:
                samples.append((marks.names[1:], *marks.offsets()))
    names = samples[0][0]
    return [(name, statistics.median(s[1][j] for s in samples), statistics.median(s[2][j] for s in samples))
            for j, name in enumerate(names)]


def host_profile(kind: str, shape_name: str, steps: int, top: int) -> None:
    """cProfile over `steps` steps (after warm-up): the Python functions holding the host, by own time."""
    criterion, preds, batch = workload(kind, shape_name)

    def step():
        clear_grads(preds)
        loss, _ = criterion(preds, batch)
        loss.sum().backward()
        torch.cuda.synchronize()

    for _ in range(10):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    print(f"   {'own us/step':>11s} {'cum us/step':>11s} {'calls/step':>10s}  function")
    for (path, line, func), (_, calls, own, cum, _) in rows:
        print(f"   {own / steps * 1e6:11.1f} {cum / steps * 1e6:11.1f} {calls / steps:10.1f}  "
              f"{Path(path).name}:{line} {func}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workload names")
    parser.add_argument("--host-profile", type=int, default=0, metavar="STEPS",
                        help="also profile the host (cProfile) over STEPS steps per workload")
    parser.add_argument("--top", type=int, default=30, help="functions listed by --host-profile")
    parser.add_argument("--calling-thread", action="store_true",
                        help="run each backward with autograd's device threads off (torch.autograd."
                             "set_multithreading_enabled(False))")
    args = parser.parse_args()
    for name in args.only.split(","):
        kind, shape_name = WORKLOADS[name.strip()]
        if args.host_profile:
            print(f"== {name}: host profile over {args.host_profile} steps (cProfile's own overhead included)")
            host_profile(kind, shape_name, args.host_profile, args.top)
        where = ", backward on the calling thread" if args.calling_thread else ""
        print(f"== {name}: medians over {args.rounds} steps (us from the step's start{where})")
        print(f"   {'point':34s} {'host':>8s} {'device':>8s}")
        for point, host, device in timeline(kind, shape_name, args.rounds, args.calling_thread):
            print(f"   {point:34s} {host:8.1f} {device:8.1f}")


if __name__ == "__main__":
    main()
