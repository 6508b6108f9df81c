"""Benchmark plumbing: GPU-correct timing, peak memory, GPU machine info, and the ours-vs-Ultralytics ratio table.

Every benchmark times through the `device_bench` fixture, which
  * makes one untimed call first (CUDA context, kernel caches, cuBLAS/cuDNN handles, allocator growth stay out),
  * synchronises inside the timed callable, so the host clock sees the GPU's work,
  * runs `benchmark.pedantic` with warm-up rounds (default 10 warm-ups, 50 timed rounds, median reported),
  * records peak CUDA memory into `benchmark.extra_info`: `peak_mem_over_inputs_bytes` is the peak of allocated
    memory during the timed rounds minus what was allocated before the first call (the inputs), so state a callable
    keeps between calls counts; `reserved_growth_bytes` is the caching allocator's growth over the whole run.
Under --benchmark-disable (CI) each benchmark body runs once, on the CPU variant, so the code paths stay tested.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.ratio_table import BASELINE, Record, format_rows, pair_rows

_RECORDS = pytest.StashKey[list]()

WARMUP_ROUNDS = 10
ROUNDS = 50


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = []
    # Under xdist pytest-benchmark times nothing (each body runs once, as with --benchmark-disable). Asking for saved
    # or compared results there would give empty or misleading files, so that is refused outright.
    xdist = config.getoption("dist", "no") != "no" or "PYTEST_XDIST_WORKER" in os.environ
    wants_results = any(
        config.getoption(name, None)
        for name in ("benchmark_json", "benchmark_save", "benchmark_autosave", "benchmark_compare")
    )
    if xdist and wants_results:
        raise pytest.UsageError(
            "benchmarks must not run under xdist: workers share the CPU and the GPU, so pytest-benchmark times "
            "nothing there; run them with -p no:xdist (or -n 0)"
        )


def _driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where it is not installed or does not answer."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def autograd_round_trip_us(rounds: int = 200) -> float:
    """Median wall time (us) of the cheapest CUDA training step, a product, a sum, a backward and a sync: the host's
    speed at what bounds small steps (it differed 2.7x between H200 machines lent on one day)."""
    leaf = torch.ones(1024, device="cuda", requires_grad=True)
    times = []
    for _ in range(rounds):
        leaf.grad = None
        start = time.perf_counter()
        (leaf * 1.0).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[rounds // 10:]) * 1e6


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the GPU, driver, CUDA runtime and torch versions, so results from different cards never get mixed up, and
    the host's autograd round trip, so absolute times from different hosts can be told apart."""
    info: dict[str, object] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
            autograd_round_trip_us=round(autograd_round_trip_us(), 1),
        )
    machine_info["cuda"] = info


class DeviceBench:
    """Times a callable on one device with `benchmark.pedantic`; see the module docstring for the protocol."""

    def __init__(self, benchmark, device: str, config: pytest.Config):
        self.benchmark = benchmark
        self.device = device
        self.config = config

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        setup: Callable[[], None] | None = None,
        pair: str | None = None,
        impl: str = "headguard",
        rounds: int = ROUNDS,
        warmup_rounds: int = WARMUP_ROUNDS,
        **extra_info,
    ) -> None:
        """Benchmark `fn()`; `setup()` runs untimed before every call (e.g. to drop gradients).

        `pair` and `impl` put the result into the ratio table: impl "ultralytics" is the baseline of its pair.
        """
        bench = self.benchmark
        bench.extra_info.update(extra_info, device=self.device, impl=impl)
        if pair is not None:
            bench.extra_info["pair"] = pair
        if bench.disabled:
            # CI: pedantic makes one plain call, which exercises the code path; nothing is timed.
            bench.pedantic(fn, setup=setup)
            return

        # The first call pays for one-time work (CUDA context, lazy module loads, cuDNN autotuning, graph capture):
        # keep it out of the warm-up rounds as well as out of the timed ones.
        if setup is not None:
            setup()
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            # Taken before the first call, so memory a callable keeps between calls (a CUDA-graph pool, caches)
            # counts against it.
            resident, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        fn()
        self._sync()
        if setup is not None:
            setup()
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def timed() -> None:
            fn()
            self._sync()

        bench.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        peak = None
        if cuda:
            peak = torch.cuda.max_memory_allocated() - resident
            bench.extra_info.update(
                peak_mem_bytes=torch.cuda.max_memory_allocated(),
                peak_mem_over_inputs_bytes=peak,
                reserved_growth_bytes=torch.cuda.memory_reserved() - reserved,
            )
        if pair is not None:
            record = Record(bench.fullname, pair, impl, bench.stats.stats.median, peak)
            self.config.stash[_RECORDS].append(record)


@pytest.fixture
def device_bench(benchmark, request) -> DeviceBench:
    """The GPU-correct timer for the test's `device` parameter ("cpu" or "cuda")."""
    device = request.getfixturevalue("device")
    return DeviceBench(benchmark, device, request.config)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """Print ours / Ultralytics' median time and peak memory for every side-by-side pair that was timed."""
    rows = pair_rows(config.stash.get(_RECORDS, []))
    if not rows:
        return
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    terminalreporter.section(f"ours vs {BASELINE} (median of timed rounds, peak memory over inputs), {gpu}")
    terminalreporter.write_line(format_rows(rows))
