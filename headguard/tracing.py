"""Find where a non-finite value first appeared in a model: which submodule, and in which pass.

`locate_nonfinite` hooks every submodule for the duration of one call: forward hooks look at outputs, full backward
hooks at the gradients flowing through the module, tensor hooks at parameter gradients. A forward origin (the first
module, in execution order, whose output is non-finite) always wins over a backward one; in the backward pass the
origin is the first module whose own backward turned finite gradients into non-finite ones. Hooks are removed
afterwards, also when `run` raises.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

OUTSIDE = "<outside the model>"

# Full backward hooks warn when a module returns a dict/list or has no input that requires grad (the head's first
# convs). Both are expected here: such modules are simply seen through their submodules or their outputs.
_HOOK_WARNINGS = ("For backward hooks to be called", "Full backward hook is firing")


class NonFiniteOrigin(NamedTuple):
    """Where the first non-finite value appeared. `module` is a qualified name such as `cv4.2.1.bn` (`<root>` for
    the model itself), `pass_` is "forward" or "backward", `detail` says which tensor and how many values."""

    module: str
    pass_: str
    detail: str

    def __str__(self) -> str:
        return f"first non-finite value in {self.module} during the {self.pass_} pass: {self.detail}"


def locate_nonfinite(
    model: nn.Module, run: Callable[[nn.Module], Any], *, backward: bool = True
) -> NonFiniteOrigin | None:
    """Call `run(model)` with every submodule hooked and return where the first non-finite value appeared.

    With `backward=True`, when `run` returns tensors that require grad (a loss, or the head's outputs) and all of
    them are finite, their sum is backpropagated, so a NaN/Inf born in the backward pass is located too (`run` may
    also call `.backward()` itself). `run` may mutate `model` (BN statistics, `.grad`): pass a copy if that
    matters. If `run` raises after a non-finite value was seen, the origin is returned (the non-finite value is the
    likely cause, e.g. a loss rejecting NaN predictions); if it raises before, the exception propagates.

    Backward attribution: the first module (in backward order) whose output gradient is finite while its input or
    parameter gradients are not. When every module already receives a non-finite output gradient, the value was
    born in code outside the modules (typically the loss), and the module named is the last one to start its
    forward pass among those, i.e. the one whose output that code consumed.
    Limitation: full backward hooks forbid modifying a module's input or output in place (`inplace=True`
    activations); use `backward=False` for such models.
    """
    tracer = _Tracer(model, backward=backward)
    with warnings.catch_warnings():
        for text in _HOOK_WARNINGS:
            warnings.filterwarnings("ignore", message=text, category=UserWarning)
        with tracer:
            try:
                out = run(model)
                if tracer.origin() is None:
                    tracer.check_result(out)
                # When `run` backpropagated itself the graph may be freed already; one backward pass is enough.
                if tracer.origin() is None and backward and not tracer.saw_backward:
                    root = _sum_requiring_grad(out)
                    if root is not None:
                        root.backward()
            except Exception:
                if tracer.origin() is not None:
                    return tracer.origin()
                raise
    return tracer.origin()


class _Tracer:
    def __init__(self, model: nn.Module, *, backward: bool):
        self.model = model
        self.backward = backward
        self.forward_origin: NonFiniteOrigin | None = None
        self.saw_backward = False
        self._started: dict[str, int] = {}  # module -> order in which its (last) forward call started
        self._clock = itertools.count()
        self._inside: list[NonFiniteOrigin] = []  # finite grad_output, non-finite grad_input
        self._param: list[NonFiniteOrigin] = []  # non-finite parameter gradient
        self._outside: dict[str, NonFiniteOrigin] = {}  # non-finite grad_output
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Tracer:
        try:
            for name, module in self.model.named_modules():
                label = name or "<root>"
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(label)))
                self._handles.append(module.register_forward_hook(self._forward_hook(label)))
                if self.backward:
                    self._handles.append(module.register_full_backward_hook(self._backward_hook(label)))
            if self.backward:
                for pname, param in self.model.named_parameters():
                    if param.requires_grad:
                        self._handles.append(param.register_hook(self._param_hook(pname)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def origin(self) -> NonFiniteOrigin | None:
        if self.forward_origin is not None:
            return self.forward_origin
        if self._inside:
            return self._inside[0]
        for event in self._param:
            if event.module not in self._outside:
                return event
        if self._outside:
            return max(self._outside.values(), key=lambda e: self._started.get(e.module, -1))
        return None

    def _pre_hook(self, label: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._started[label] = next(self._clock)

        return hook

    def _forward_hook(self, label: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.forward_origin is not None:
                return
            bad_out = _describe_nonfinite(output, "output")
            if bad_out is None:
                return
            bad_in = _describe_nonfinite(args, "input")
            if bad_in is not None:
                detail = f"{bad_out}; its {bad_in} already (produced by code between modules, or given to the model)"
            else:
                detail = bad_out + _own_state_note(module)
            self.forward_origin = NonFiniteOrigin(label, "forward", detail)

        return hook

    def _backward_hook(self, label: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            self.saw_backward = True
            bad_out = _describe_nonfinite(grad_output, "gradient w.r.t. the output")
            if bad_out is not None:
                self._outside.setdefault(label, NonFiniteOrigin(label, "backward", (
                    f"{bad_out}: it came from the code that consumes this module's output (e.g. the loss), "
                    "not from a module")))
                return
            bad_in = _describe_nonfinite(grad_input, "gradient w.r.t. the input")
            if bad_in is not None:
                self._inside.append(
                    NonFiniteOrigin(label, "backward", f"{bad_in} while the gradient w.r.t. its output is finite"))

        return hook

    def _param_hook(self, pname: str):
        module, _, leaf = pname.rpartition(".")

        def hook(grad: torch.Tensor) -> None:
            self.saw_backward = True
            bad = _describe_nonfinite(grad, f"gradient of its parameter {leaf!r}")
            if bad is not None:
                self._param.append(NonFiniteOrigin(module or "<root>", "backward", bad))

        return hook

    def check_result(self, out: Any) -> None:
        """Non-finite results with every module output finite: the value came from `run`'s own code."""
        bad = _describe_nonfinite(out, "result of run()")
        if bad is not None:
            detail = f"{bad}, although every module's output was finite"
            self.forward_origin = NonFiniteOrigin(OUTSIDE, "forward", detail)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _describe_nonfinite(obj: Any, what: str) -> str | None:
    """'output has 3 NaN and 1 inf of 96 values', or None when every floating tensor in `obj` is finite."""
    nan = inf = total = 0
    for t in _tensors(obj):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        nan += int(torch.isnan(t).sum())
        inf += int(torch.isinf(t).sum())
        total += t.numel()
    if nan == 0 and inf == 0:
        return None
    parts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n]
    return f"{what} has {' and '.join(parts)} of {total} values"


def _own_state_note(module: nn.Module) -> str:
    """Name the module's own non-finite parameters/buffers: a poisoned running_var explains a NaN output at once."""
    bad = [name for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
           if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        return f", from finite inputs; its own {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} non-finite"
    return ", from finite inputs"


def _sum_requiring_grad(out: Any) -> torch.Tensor | None:
    """One scalar to backpropagate through everything `run` returned that requires grad."""
    parts = [t.float().sum() for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    if not parts:
        return None
    return torch.stack(parts).sum()
