"""CUDA-graph replay of a loss core, forward and backward, one captured pair of graphs per input signature.

A loss is bound by kernel launches and Python at training shapes (a few hundred small kernels). Capturing the
sync-free, static-shape part once and replaying it removes both. Used only where it is safe: CUDA tensors, grad mode
on, no tracing; anything else, or a capture that fails, runs the same core eagerly (so results never depend on it).

Each replay writes into the captured (static) buffers; outputs and input gradients are cloned out, so tensors handed
to the caller are never overwritten by a later call. A backward whose forward is no longer the latest replay first
replays that forward again from its own saved inputs, so interleaved calls stay correct. A caller that keeps its own
static buffers (filled once per call and read by more than one graph) passes them as `preloaded`: they become the
graph's inputs and are not copied again. `GraphedFunction` is the no-gradient counterpart (the losses' input checks
and target slots), over caller-owned buffers only.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

_WARMUP_ITERS = 3  # lazy cuBLAS/cuDNN workspaces must exist before capture (PyTorch's own recommendation)


def _signature(tensors: tuple[torch.Tensor, ...], preloaded: tuple[torch.Tensor | None, ...]) -> tuple:
    """What a capture depends on: each copied input's shape, dtype, device and grad flag (not its strides: it is
    copied into a dense buffer), and each preloaded buffer's identity."""
    return tuple(
        (t.shape, t.dtype, t.device, t.requires_grad) if buf is None else ("preloaded", buf.data_ptr(), buf.shape)
        for t, buf in zip(tensors, preloaded)
    )


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
    preloaded: tuple[bool, ...]  # inputs whose static buffer the caller fills before each call
    holder: _Call | None = None  # the call whose copied inputs and activations this pair's buffers hold


@dataclass
class _Call:
    """One replayed forward. `snapshot` keeps its copied inputs once another call overwrites them before its
    backward has run (`done`), so that backward can replay this forward again."""

    snapshot: tuple[torch.Tensor | None, ...] | None = None
    done: bool = False


class GraphedCore:
    """Replays `fn(*tensors) -> tensor` through CUDA graphs; `fn` must be free of host syncs and of data-dependent
    shapes. Python-side choices inside `fn` must be named in `key` at each call."""

    def __init__(self, fn: Callable[..., torch.Tensor], max_signatures: int = 8):
        self.fn = fn
        self.max_signatures = max_signatures
        self._cache: dict[tuple, _Captured] = {}
        self.disabled_reason: str | None = None
        self.loaded: _Call | None = None  # the call whose values the callers' preloaded buffers hold

    def preloaded_changed(self) -> None:
        """The caller refilled its preloaded buffers: no earlier call's values are there any more."""
        self.loaded = None

    def usable(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Graphs only for CUDA inputs with autograd recording, outside autocast, capture and compiler tracing."""
        return (
            self.disabled_reason is None
            and all(t.is_cuda for t in tensors)  # CUDA tensors: CUDA is available (is_available() costs ~10 us)
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors)
            and not torch.cuda.is_current_stream_capturing()
            # autocast's cast cache would hand a capture tensors freed when the autocast block ends
            and not _autocast_on()
            and not torch.compiler.is_compiling()
        )

    def __call__(self, *tensors: torch.Tensor, key: tuple = (),
                 preloaded: tuple[torch.Tensor | None, ...] = ()) -> torch.Tensor:
        """`fn(*tensors)`; `key` names Python-side choices `fn` makes, so each gets its own graphs. `preloaded[i]`,
        where given, is a buffer the caller owns, keeps and has already filled with `tensors[i]`'s values (with
        `tensors[i]`'s grad flag): the graphs read it directly."""
        if not self.usable(tensors):
            return self.fn(*tensors)
        preloaded = tuple(preloaded) + (None,) * (len(tensors) - len(preloaded))
        key = (_signature(tensors, preloaded), key)
        captured = self._cache.get(key)
        if captured is None:
            if len(self._cache) >= self.max_signatures:
                # Many distinct shapes (e.g. a varying image size): graphs would only cost memory.
                return self.fn(*tensors)
            try:
                captured = self._capture(tensors, preloaded)
            except RuntimeError as exc:  # capture refused (an op that syncs, an unsupported kernel): stay eager
                self.disabled_reason = f"CUDA-graph capture failed, running eagerly: {exc}"
                torch.cuda.synchronize()
                return self.fn(*tensors)
            self._cache[key] = captured
        return _Replay.apply(self, captured, *tensors)

    def _capture(self, tensors: tuple[torch.Tensor, ...], preloaded: tuple[torch.Tensor | None, ...]) -> _Captured:
        static = tuple(
            t.detach().clone().requires_grad_(t.requires_grad) if buf is None else buf
            for t, buf in zip(tensors, preloaded)
        )
        diff = [i for i, t in enumerate(static) if t.requires_grad]
        def warm_up() -> None:
            out = self.fn(*static)
            torch.autograd.grad(out, [static[i] for i in diff], torch.ones_like(out), allow_unused=True)

        _warm_up(warm_up)
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd):
            output = self.fn(*static)
        grad_output = torch.empty_like(output)
        with torch.cuda.graph(bwd, pool=fwd.pool()):
            partial = torch.autograd.grad(output, [static[i] for i in diff], grad_output, allow_unused=True)
        grads: list[torch.Tensor | None] = [None] * len(static)
        for i, g in zip(diff, partial):
            grads[i] = g
        return _Captured(fwd, bwd, static, output, grad_output, tuple(grads), tuple(b is not None for b in preloaded))


def _warm_up(run: Callable[[], None]) -> None:
    """Run a function to be captured a few times on a side stream first (lazy workspaces, autotuning), then collect.

    Graphs of losses no longer referenced sit in reference cycles until the cyclic collector frees them; freed during
    a capture, their reset is an illegal call that invalidates it (torch no longer collects first, see
    torch.compiler.config.force_cudagraph_gc). Collect now, once per captured signature.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_ITERS):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    gc.collect()


class GraphedFunction:
    """Replays `fn()` (no gradient) as one CUDA graph per key; `fn` reads only caller-owned buffers that keep their
    storage for the key, and must be free of host syncs. Outputs are the graph's own buffers, overwritten by the next
    replay of the same key. Exceptions from `fn` (also a failed capture's RuntimeError) reach the caller."""

    def __init__(self, max_signatures: int = 8):
        self.max_signatures = max_signatures
        self._cache: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}

    def __call__(self, key: tuple, fn: Callable[[], object]):
        """fn()'s outputs for this key: replayed when captured before, else captured now (eagerly once the cache is
        full)."""
        if key in self._cache:
            graph, outputs = self._cache[key]
            graph.replay()
            return outputs
        if len(self._cache) >= self.max_signatures:
            return fn()
        with torch.no_grad():
            _warm_up(fn)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn()
        self._cache[key] = (graph, outputs)
        graph.replay()  # capture only records: the outputs are written by a replay
        return outputs


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core: GraphedCore, captured: _Captured, *tensors: torch.Tensor) -> torch.Tensor:
        _keep_inputs(captured)
        _load_and_replay(captured, tensors, skip=captured.preloaded)
        call = _Call()
        captured.holder = core.loaded = call
        ctx.core, ctx.captured, ctx.call = core, captured, call
        # Preloaded inputs are restored from the caller's tensors, the copied ones from the snapshot.
        ctx.save_for_backward(*(t if pre else None for t, pre in zip(tensors, captured.preloaded)))
        ctx.needs = tuple(t.requires_grad for t in tensors)
        return captured.output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        core, captured, call = ctx.core, ctx.captured, ctx.call
        if captured.holder is not call or (any(captured.preloaded) and core.loaded is not call):
            # Another call replayed a forward since ours: its values sit in the buffers. Restore ours and replay.
            if captured.holder is not call and call.snapshot is None:
                raise RuntimeError("a second backward through a replayed loss after a later call; call backward once "
                                   "per loss evaluation, or use cuda_graphs=False")
            _keep_inputs(captured, call)
            copied = call.snapshot if call.snapshot is not None else captured.inputs
            restored = tuple(s if pre else c for s, c, pre in zip(ctx.saved_tensors, copied, captured.preloaded))
            _load_and_replay(captured, restored)
            captured.holder = core.loaded = call
        captured.grad_output.copy_(grad_output)
        captured.bwd.replay()
        call.done, call.snapshot = True, None
        grads = tuple(
            g.clone() if (g is not None and need) else None for g, need in zip(captured.grads, ctx.needs)
        )
        return (None, None, *grads)


def _keep_inputs(captured: _Captured, call: _Call | None = None) -> None:
    """Before the copied inputs are overwritten: snapshot them for the call holding them if its backward is due
    (unless it is `call`, the one being restored)."""
    holder = captured.holder
    if holder is not None and holder is not call and not holder.done and holder.snapshot is None:
        holder.snapshot = tuple(None if pre else static.detach().clone()
                                for static, pre in zip(captured.inputs, captured.preloaded))


def _load_and_replay(captured: _Captured, tensors, skip: tuple[bool, ...] = ()) -> None:
    """Copy the inputs into the static buffers (except those flagged in `skip`: already there) and replay."""
    # Skipped: buffers the caller preloaded, and any input that is its own static buffer (a constant the caller
    # keeps; copying it onto itself would bump its version under autograd's saved tensors).
    pairs = [(static, t) for i, (static, t) in enumerate(zip(captured.inputs, tensors))
             if not (skip and skip[i]) and static.data_ptr() != t.data_ptr()]
    if pairs:
        with torch.no_grad():  # one call for all the copies (a list of copies in C++, not Python)
            torch._foreach_copy_([static for static, _ in pairs], [t for _, t in pairs])
    captured.fwd.replay()
