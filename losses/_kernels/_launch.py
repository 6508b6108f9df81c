"""Kernel launches that skip Triton's per-call Python once a kernel is compiled (needs Triton; private).

`kernel[grid](*args, **kwargs)` through Triton's JIT binds the arguments, computes their specialisation and cache
key, builds launch metadata and then calls the compiled kernel's launcher: 27 us of host time per MGIoU launch on an
H200 host, against 7 for the launcher alone (`benchmarks/host_time.py`). `DirectLaunch` wraps a `triton.jit` kernel
(a decorator) so that the first call with a new specialisation goes through the JIT (which compiles and launches it)
and later calls go straight to the launcher that call found.

The key is what Triton 3.6 specialises a kernel on: per tensor its dtype and whether its address is a multiple of
16; per integer whether it is 1, a multiple of 16, and which integer type holds it; other runtime values (floats,
bools) by type; constexprs and launch options (warps, fp fusion) by value; and the current device. Runtime
parameters come positionally and constexprs by keyword; a call that passes them otherwise takes the JIT. The launcher's calling convention
(grid, stream, function, metadata, hooks, then every parameter in order) is Triton 3.6's too, so other versions take
the JIT every time, as do Triton's interpreter, its debug mode and launches while a launch hook is registered (a
profiler's: the direct path would skip it).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

CHECKED_VERSION = "3.6."  # the Triton whose specialisation and launcher convention the key and call follow
_I32 = range(-(2**31), 2**31)
_I64 = range(-(2**63), 2**63)


def _key(args: tuple, kwargs: dict) -> tuple:
    """What Triton 3.6 specialises runtime arguments `args` and keyword constexprs and options `kwargs` on."""
    return (torch.cuda.current_device(), tuple(kwargs.items()), *[
        (arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor)
        else (arg == 1, arg % 16 == 0, arg in _I32, arg in _I64) if isinstance(arg, int) and not isinstance(arg, bool)
        else type(arg)  # runtime floats and bools: Triton types them (fp32, i1), it does not specialise on them
        for arg in args])


class DirectLaunch:
    """`kernel[grid](*args, **kwargs)` as Triton's JIT launches it, through the compiled kernel's own launcher after
    the first call of each specialisation (module docstring). `.jit` is the wrapped kernel."""

    def __init__(self, kernel):
        self.jit = kernel
        self.enabled = (isinstance(kernel, JITFunction) and triton.__version__.startswith(CHECKED_VERSION)
                        and not any(param.has_default for param in kernel.params))
        params = kernel.params if self.enabled else []
        self._names = [param.name for param in params]
        self._runtime = [param.name for param in params if not param.is_constexpr]
        # Runtime parameters lead: a positional constexpr would be keyed as a runtime integer.
        self.enabled = self.enabled and self._names[:len(self._runtime)] == self._runtime
        self._compiled: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return functools.partial(self._launch, tuple(grid))

    def _launch(self, grid: tuple, *args, **kwargs) -> None:
        hooks = knobs.runtime
        if (not self.enabled or len(args) != len(self._runtime) or hooks.debug or hooks.launch_enter_hook.calls
                or hooks.launch_exit_hook.calls):
            self.jit[grid](*args, **kwargs)
            return
        key = _key(args, kwargs)
        launcher = self._compiled.get(key)
        if launcher is None:
            compiled = self.jit[grid](*args, **kwargs)
            self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return
        run, function, metadata = launcher
        values = (*args, *[kwargs[name] for name in self._names[len(args):]])
        stream = driver.active.get_current_stream(key[0])
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, function, metadata,
            None, None, None, *values)
