"""locate_nonfinite names the first module (and pass) where a NaN/Inf appeared, and leaves no hooks behind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from headguard.tracing import OUTSIDE, NonFiniteOrigin, locate_nonfinite


class ConvBN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Branches(nn.Module):
    """Three levels, each a Conv-BN-SiLU stack: module names like `cv4.2.1.bn`, as in a detection head."""

    def __init__(self, c: int = 4, depth: int = 3):
        super().__init__()
        self.cv4 = nn.ModuleList(nn.Sequential(*(ConvBN(c) for _ in range(depth))) for _ in range(3))

    def forward(self, feats):
        return [branch(f) for branch, f in zip(self.cv4, feats)]


class VectorNorm(nn.Module):
    """sqrt(sum x^2): finite at x = 0, but its gradient there is 0/0 = NaN."""

    def forward(self, x):
        return torch.sqrt((x * x).sum(dim=1))


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.norm = VectorNorm()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)).unsqueeze(1))


def feats(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g, requires_grad=True) for _ in range(3)]


def assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for param in model.parameters():
        assert not param._backward_hooks


def zero_norm_model() -> WithNorm:
    model = WithNorm()
    with torch.no_grad():
        model.proj.weight.zero_()
        model.proj.bias.zero_()
    return model


@settings(max_examples=10)
@given(level=st.integers(0, 2), layer=st.integers(0, 2), channel=st.integers(0, 3),
       poison=st.sampled_from([("running_var", float("nan")), ("running_mean", float("inf")),
                               ("running_var", -1.0)]))
def test_poisoned_bn_statistics_are_found_in_the_forward_pass(level, layer, channel, poison):
    # (An inf running_var alone gives a finite 0 output; -1 is finite but makes sqrt(var + eps) NaN, so there the
    # output, not the buffer, is where it first shows.)
    buffer, value = poison
    model = Branches().eval()
    getattr(model.cv4[level][layer].bn, buffer)[channel] = value
    origin = locate_nonfinite(model, lambda m: m(feats()))
    assert origin.module == f"cv4.{level}.{layer}.bn"
    assert origin.pass_ == "forward"
    assert (f"its own {buffer} is non-finite" in origin.detail) == (value != -1.0)
    assert_no_hooks(model)


def test_sqrt_of_zero_is_found_in_the_backward_pass():
    model = zero_norm_model()
    x = torch.randn(4, 3)
    origin = locate_nonfinite(model, lambda m: m(x))
    assert origin == NonFiniteOrigin("norm", "backward", origin.detail)
    assert "gradient w.r.t. the input has 12 NaN" in origin.detail and "output is finite" in origin.detail
    assert_no_hooks(model)


def test_backward_nan_born_after_the_model_is_blamed_on_the_consumer():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    x = torch.randn(4, 3)
    # sqrt(0) in the caller's loss: the last module sees a NaN gradient arriving at its output.
    origin = locate_nonfinite(model, lambda m: torch.sqrt(m(x) * 0).sum())
    assert origin.module == "1" and origin.pass_ == "backward"
    assert "came from the code that consumes this module's output" in origin.detail


def test_run_that_backpropagates_itself_is_traced_once():
    model = zero_norm_model()
    x = torch.randn(4, 3)

    def run(m):
        out = m(x).sum()
        out.backward()
        return out

    assert locate_nonfinite(model, run).module == "norm"


def test_forward_nan_made_outside_the_model():
    model = nn.Linear(3, 1)
    origin = locate_nonfinite(model, lambda m: m(torch.randn(4, 3)) / 0 * 0, backward=False)
    assert origin.module == OUTSIDE and origin.pass_ == "forward"


def test_nonfinite_input_is_reported_as_such():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    origin = locate_nonfinite(model, lambda m: m(x))
    assert origin.module == "0" and "its input has 1 NaN of 12 values already" in origin.detail


def test_all_finite_gives_none():
    model = Branches().train()
    assert locate_nonfinite(model, lambda m: m(feats())) is None
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert_no_hooks(model)


class Raises(nn.Module):
    def __init__(self, poison: bool):
        super().__init__()
        self.first = nn.Linear(3, 3)
        if poison:
            with torch.no_grad():
                self.first.bias[1] = float("nan")

    def forward(self, x):
        y = self.first(x)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("predictions contain NaN")  # as the reference loss does (R8)
        raise RuntimeError("unrelated crash")


def test_module_raising_after_a_nonfinite_value_still_gives_the_origin():
    model = Raises(poison=True)
    origin = locate_nonfinite(model, lambda m: m(torch.randn(2, 3)))
    assert origin == NonFiniteOrigin("first", "forward", origin.detail)
    assert "its own bias is non-finite" in origin.detail
    assert_no_hooks(model)


def test_module_raising_before_any_nonfinite_value_propagates_and_unhooks():
    model = Raises(poison=False)
    with pytest.raises(RuntimeError, match="unrelated crash"):
        locate_nonfinite(model, lambda m: m(torch.randn(2, 3)))
    assert_no_hooks(model)


def test_nonfinite_weight_is_named():
    model = Branches().eval()
    with torch.no_grad():
        model.cv4[1][2].conv.weight[0, 0, 0, 0] = float("inf")
    origin = locate_nonfinite(model, lambda m: m(feats()), backward=False)
    assert origin.module == "cv4.1.2.conv" and "its own weight is non-finite" in origin.detail
    assert str(origin).startswith("first non-finite value in cv4.1.2.conv during the forward pass")
