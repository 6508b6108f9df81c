"""`losses._kernels._launch.DirectLaunch`: after the JIT's first launch of a specialisation, later launches go to the
compiled kernel's launcher with the same results; a new specialisation (alignment, an integer of 1, a constexpr) goes
through the JIT again; a registered launch hook sends every launch through the JIT. GPU only (`cuda` marker)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

from losses._kernels._launch import DirectLaunch  # noqa: E402

pytestmark = pytest.mark.cuda


@triton.jit
def _scaled_copy(src, dst, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(dst + offsets, tl.load(src + offsets, mask=inside) * factor, mask=inside)


class _CountedJIT:
    """The JIT kernel, counting the launches that go through it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launch():
    wrapped = DirectLaunch(_scaled_copy)
    assert wrapped.enabled, f"Triton {triton.__version__} is not the checked version"
    wrapped.jit = _CountedJIT(_scaled_copy)
    return wrapped


def _scaled(launch, src, n, factor, block=64):
    dst = torch.full_like(src, -1.0)
    launch[(triton.cdiv(n, block),)](src, dst, n, factor, BLOCK=block)
    return dst


def test_later_launches_skip_the_jit_and_pass_every_runtime_value(launch):
    src = torch.arange(1000, dtype=torch.float32, device="cuda")
    assert torch.equal(_scaled(launch, src, 1000, 2.0), src * 2)
    # Another count (not 1, not a multiple of 16 either way) and another runtime float: the same specialisation.
    assert torch.equal(_scaled(launch, src, 500, 3.0)[:500], src[:500] * 3)
    assert launch.jit.launches == 1 and len(launch._compiled) == 1


@pytest.mark.parametrize("change", ["misaligned tensor", "integer of 1", "constexpr", "dtype"])
def test_a_new_specialisation_goes_through_the_jit(launch, change):
    src = torch.arange(1000, dtype=torch.float32, device="cuda")
    _scaled(launch, src, 1000, 2.0)
    if change == "misaligned tensor":
        other = src[1:]  # 4 bytes past a 16-byte boundary
        assert other.data_ptr() % 16 != 0
        assert torch.equal(_scaled(launch, other, 999, 2.0), other * 2)
    elif change == "integer of 1":
        assert _scaled(launch, src, 1, 2.0)[:2].tolist() == [0.0, -1.0]
    elif change == "constexpr":
        assert torch.equal(_scaled(launch, src, 1000, 2.0, block=128), src * 2)
    else:
        half = src.half()
        assert torch.equal(_scaled(launch, half, 1000, 2.0), half * 2)
    assert launch.jit.launches == 2 and len(launch._compiled) == 2
    _scaled(launch, src, 1000, 2.0)
    assert launch.jit.launches == 2, "the first specialisation's launcher was not kept"


def test_a_registered_launch_hook_sends_launches_through_the_jit(launch):
    src = torch.arange(100, dtype=torch.float32, device="cuda")
    _scaled(launch, src, 100, 2.0)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert torch.equal(_scaled(launch, src, 100, 2.0), src * 2)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert launch.jit.launches == 2 and len(seen) == 1


def test_every_kernel_the_losses_launch_has_a_direct_launcher():
    """Each kernel the losses and `mgiou` launch passes its runtime parameters positionally and its constexprs by
    keyword, so `DirectLaunch` keeps its launcher (a call site that did not would take the JIT on every launch)."""
    from losses import mgiou
    from losses._kernels import _triton
    from tests.test_fast_paths import MODES, _criteria, _cuda_case, _evaluate

    for mode in MODES:
        fast = _criteria(mode)[1]
        preds, batch = _cuda_case()
        _evaluate(fast, mode, preds, batch, 0.4)
    pred = torch.rand(64, 8, 2, device="cuda", requires_grad=True)
    mgiou(pred, torch.rand(64, 8, 2, device="cuda")).sum().backward()
    kernels = {name: value for name, value in vars(_triton).items() if isinstance(value, DirectLaunch)}
    compiled = {name for name, kernel in kernels.items()
                if any(caches[0] for caches in kernel.jit.device_caches.values())}
    assert {"_mgiou_kernel", "_mgiou_problems_kernel", "_class_bce_fwd_kernel"} <= compiled
    assert sorted(name for name in compiled if not kernels[name]._compiled) == []
