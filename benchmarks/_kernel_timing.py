"""Device-time helpers of the kernel timing scripts: a kernel module at another revision, a call's kernel time."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]


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


def device_us(call, reps: int, name_part: str = "") -> float:
    """Mean device time per call of the kernels `call` launches whose name holds `name_part` (all: "")."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if name_part in e.key and not e.key.startswith(("aten::", "cuda"))]
    return sum(e.self_device_time_total for e in kernels) / reps
