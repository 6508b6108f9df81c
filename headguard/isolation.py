"""Keep one target's or one check's global torch state from leaking into the next: save it, restore it, and say
what changed. Also the seeded block every subject is built in, and the time limit every check runs under."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import torch


def _flush_denormal() -> bool:
    """torch has a setter but no getter: with flush-to-zero on, a float32 denormal times 2 reads back as 0."""
    return float(torch.tensor([1e-40], dtype=torch.float32) * 2) == 0.0


@dataclasses.dataclass(frozen=True)
class TorchState:
    """The process-wide torch settings a head, a loss or a check can change behind our back."""

    default_dtype: torch.dtype
    grad_enabled: bool
    anomaly_enabled: bool
    anomaly_check_nan: bool
    flush_denormal: bool
    deterministic: bool
    deterministic_warn_only: bool
    float32_matmul_precision: str
    num_threads: int
    cudnn_enabled: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool

    @classmethod
    def capture(cls) -> TorchState:
        return cls(
            default_dtype=torch.get_default_dtype(),
            grad_enabled=torch.is_grad_enabled(),
            anomaly_enabled=torch.is_anomaly_enabled(),
            anomaly_check_nan=torch.is_anomaly_check_nan_enabled(),
            flush_denormal=_flush_denormal(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            num_threads=torch.get_num_threads(),
            cudnn_enabled=torch.backends.cudnn.enabled,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_deterministic=torch.backends.cudnn.deterministic,
        )

    def restore(self) -> None:
        """Put every setting back. Only the settings that differ are touched: the first call of
        `torch.use_deterministic_algorithms` imports torch's compiler stack (measured 1.5-2.9 s)."""
        now = TorchState.capture()
        if now == self:
            return
        if (now.deterministic, now.deterministic_warn_only) != (self.deterministic, self.deterministic_warn_only):
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad_enabled)
        torch.autograd.set_detect_anomaly(self.anomaly_enabled, check_nan=self.anomaly_check_nan)
        torch.set_flush_denormal(self.flush_denormal)
        torch.set_float32_matmul_precision(self.float32_matmul_precision)
        torch.set_num_threads(self.num_threads)
        torch.backends.cudnn.enabled = self.cudnn_enabled
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic

    def changes_to(self, after: TorchState) -> list[str]:
        """'default_dtype torch.float32 -> torch.float64' for each setting that differs in `after`."""
        return [
            f"{f.name} {getattr(self, f.name)} -> {getattr(after, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(after, f.name)
        ]


@contextlib.contextmanager
def isolated_torch_state(*, generators: bool = True) -> Iterator[list[str]]:
    """Restore torch's global settings, and with `generators` its and Python's random number generators, when the
    block ends. The yielded list is filled, on exit, with the settings the block changed (the generators are
    restored silently: every check draws)."""
    before = TorchState.capture()
    changes: list[str] = []
    rngs = (torch.random.fork_rng(), _python_random_state()) if generators else ()
    with contextlib.ExitStack() as stack:
        for rng in rngs:
            stack.enter_context(rng)
        try:
            yield changes
        finally:
            changes.extend(before.changes_to(TorchState.capture()))
            before.restore()


@contextlib.contextmanager
def _python_random_state() -> Iterator[None]:
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def seed_everything(seed: int) -> None:
    """Seed torch's and Python's generators: a subject is built, and every check runs, from this state."""
    torch.manual_seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[list[str]]:
    """An isolated block (see `isolated_torch_state`) that starts from `seed_everything(seed)`."""
    with isolated_torch_state() as changes:
        seed_everything(seed)
        yield changes


# --- time limits -----------------------------------------------------------------------------------------------------

class CheckTimeout(BaseException):
    """A check ran past its time limit. A BaseException, as KeyboardInterrupt is, so that neither Hypothesis nor a
    check's `except Exception` treats it as a failing example: it unwinds straight to the runner. `where` is the
    innermost frame of the subject's own code when the limit struck (or the innermost frame of all)."""

    def __init__(self, seconds: float, where: str):
        super().__init__(f"ran past its time limit of {seconds:g} s; stuck at {where}")
        self.seconds = seconds
        self.where = where


_HARNESS_DIRS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.abspath(torch.__file__)),
    os.path.dirname(os.path.abspath(contextlib.__file__)),  # the standard library
)


def _where(frame: Any) -> str:
    """'file:line in function: source' of the innermost frame outside headguard, torch, Hypothesis and the standard
    library: the line of the subject that was running."""
    stack = traceback.extract_stack(frame)

    def foreign(entry: traceback.FrameSummary) -> bool:
        path = os.path.abspath(entry.filename)
        return not path.startswith(_HARNESS_DIRS) and f"{os.sep}hypothesis{os.sep}" not in path

    entry = next((e for e in reversed(stack) if foreign(e)), stack[-1])
    return f"{entry.filename}:{entry.lineno} in {entry.name}" + (f": {entry.line}" if entry.line else "")


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CheckTimeout in the block once it has run `seconds` of wall time (None or 0: no limit).

    Uses SIGALRM, so it works in the main thread of a POSIX process and interrupts Python code, including a sleep;
    a block stuck inside one native call is interrupted when that call returns. Elsewhere the block runs unlimited.
    """
    usable = bool(seconds) and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CheckTimeout(float(seconds), _where(frame))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure (CUDA OOM, CPU allocator failure, MemoryError): a resource limit of this
    machine, not a property of the subject."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


__all__ = [
    "CheckTimeout", "TorchState", "is_out_of_memory", "isolated_torch_state", "seed_everything", "seeded",
    "time_limit",
]
