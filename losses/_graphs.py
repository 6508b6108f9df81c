"""CUDA-graph replay of a loss core, forward and backward, one captured pair of graphs per input signature.

A loss is bound by kernel launches and Python at training shapes (a few hundred small kernels). Capturing the
sync-free, static-shape part once and replaying it removes both. Used only where it is safe: CUDA tensors, grad mode
on, no tracing; anything else, or a capture that fails, runs the same core eagerly (so results never depend on it).

Each replay writes into the captured (static) buffers; outputs and input gradients are cloned out, so tensors handed
to the caller are never overwritten by a later call. A backward whose forward is no longer the latest replay first
replays that forward again from its own saved inputs, so interleaved calls stay correct.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

_WARMUP_ITERS = 3  # lazy cuBLAS/cuDNN workspaces must exist before capture (PyTorch's own recommendation)


def _signature(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.shape, t.dtype, t.device, t.requires_grad, t.stride()) for t in tensors)


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


@dataclass
class _Captured:
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    grad_output: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]  # None where the input needs no gradient
    last_owner: object = None  # the _Replay call whose forward the static buffers hold


class GraphedCore:
    """Replays `fn(*tensors) -> tensor` through CUDA graphs; `fn` must be free of host syncs and of data-dependent
    shapes. Python-side choices inside `fn` must be named in `key` at each call."""

    def __init__(self, fn: Callable[..., torch.Tensor], max_signatures: int = 8):
        self.fn = fn
        self.max_signatures = max_signatures
        self._cache: dict[tuple, _Captured] = {}
        self.disabled_reason: str | None = None

    def usable(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Graphs only for CUDA inputs with autograd recording, outside autocast, capture and compiler tracing."""
        return (
            self.disabled_reason is None
            and torch.cuda.is_available()
            and all(t.is_cuda for t in tensors)
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors)
            and not torch.cuda.is_current_stream_capturing()
            # autocast's cast cache would hand a capture tensors freed when the autocast block ends
            and not _autocast_on()
            and not torch.compiler.is_compiling()
        )

    def __call__(self, *tensors: torch.Tensor, key: tuple = ()) -> torch.Tensor:
        """`fn(*tensors)`; `key` names Python-side choices `fn` makes, so each gets its own graphs."""
        if not self.usable(tensors):
            return self.fn(*tensors)
        key = (_signature(tensors), key)
        captured = self._cache.get(key)
        if captured is None:
            if len(self._cache) >= self.max_signatures:
                # Many distinct shapes (e.g. a varying image size): graphs would only cost memory.
                return self.fn(*tensors)
            try:
                captured = self._capture(tensors)
            except RuntimeError as exc:  # capture refused (an op that syncs, an unsupported kernel): stay eager
                self.disabled_reason = f"CUDA-graph capture failed, running eagerly: {exc}"
                torch.cuda.synchronize()
                return self.fn(*tensors)
            self._cache[key] = captured
        return _Replay.apply(captured, *tensors)

    def _capture(self, tensors: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        diff = [i for i, t in enumerate(static) if t.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                out = self.fn(*static)
                torch.autograd.grad(out, [static[i] for i in diff], torch.ones_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # Graphs of losses no longer referenced sit in reference cycles until the cyclic collector frees them; freed
        # during a capture, their reset is an illegal call that invalidates it (torch no longer collects first, see
        # torch.compiler.config.force_cudagraph_gc). Collect now, once per captured signature.
        gc.collect()

        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd):
            output = self.fn(*static)
        grad_output = torch.empty_like(output)
        with torch.cuda.graph(bwd, pool=fwd.pool()):
            partial = torch.autograd.grad(output, [static[i] for i in diff], grad_output, allow_unused=True)
        grads: list[torch.Tensor | None] = [None] * len(static)
        for i, g in zip(diff, partial):
            grads[i] = g
        return _Captured(fwd, bwd, static, output, grad_output, tuple(grads))


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured: _Captured, *tensors: torch.Tensor) -> torch.Tensor:
        _load_and_replay(captured, tensors)
        ctx.captured = captured
        ctx.owner = object()
        captured.last_owner = ctx.owner
        ctx.save_for_backward(*tensors)
        ctx.needs = tuple(t.requires_grad for t in tensors)
        return captured.output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        captured: _Captured = ctx.captured
        if captured.last_owner is not ctx.owner:
            # Another call replayed the forward since ours: its activations sit in the buffers. Restore ours.
            _load_and_replay(captured, ctx.saved_tensors)
            captured.last_owner = ctx.owner
        captured.grad_output.copy_(grad_output)
        captured.bwd.replay()
        grads = tuple(
            g.clone() if (g is not None and need) else None for g, need in zip(captured.grads, ctx.needs)
        )
        return (None, *grads)


def _load_and_replay(captured: _Captured, tensors) -> None:
    for static, t in zip(captured.inputs, tensors):
        static.detach().copy_(t.detach())
    captured.fwd.replay()
