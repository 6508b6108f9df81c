"""R6 — MGIoU without a usable epsilon: on an axis where both projections have zero extent the 1-D GIoU is 0/0; an
epsilon of 1e-9 is 0 in fp16, and degenerate axes "masked" by multiplying by 0 still give NaN * 0 = NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mutants
from losses.mgiou import mgiou

CHECK = "check_loss_finite_degenerate_targets"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SQUARE = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
# Degenerate targets (4 vertices each, unit scale): every one has an axis on which both shapes project to a point.
FAMILIES = {
    "all_equal": [[0.5, 0.5]] * 4,
    "collinear": [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.25, 0.25]],
    "repeated_vertex": [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
    "zero_width": [[0.5, 0.0], [0.5, 0.0], [0.5, 1.0], [0.5, 1.0]],
    "all_zero": [[0.0, 0.0]] * 4,
}


def _pair(family: str, dtype, scale: float = 1.0, offset: float = 0.0):
    """(pred, target) (1, 4, 2) leaves; `all_zero` is degenerate on both sides, the others on the target only."""
    target = torch.tensor([FAMILIES[family]]) * scale + offset
    pred = target.clone() if family == "all_zero" else torch.tensor([SQUARE]) * scale + offset
    return pred.to(dtype).requires_grad_(True), target.to(dtype)


def _finite_loss_and_grad(loss_fn, pred, target) -> bool:
    loss = loss_fn(pred, target)
    loss.sum().backward()
    return bool(torch.isfinite(loss).all()) and bool(torch.isfinite(pred.grad).all())


def finite_for_degenerate_families(loss_fn):
    """The property as a Hypothesis test of `loss_fn`: loss in [0, 1] and gradients finite for every degenerate
    family, dtype, scale and offset. The explicit example (all vertices equal, fp16) always runs."""

    @example(family="all_equal", dtype=torch.float16, scale=1.0, offset=0.0)
    @given(
        family=st.sampled_from(sorted(FAMILIES)),
        dtype=st.sampled_from(DTYPES),
        scale=st.sampled_from((1e-3, 1.0, 100.0)),
        offset=st.sampled_from((0.0, 7.5, 300.0)),
    )
    def prop(family, dtype, scale, offset):
        pred, target = _pair(family, dtype, scale, offset)
        loss = loss_fn(pred, target)
        loss.sum().backward()
        assert bool(torch.isfinite(loss).all()) and bool(((loss >= 0) & (loss <= 1)).all()), loss
        assert bool(torch.isfinite(pred.grad).all()), pred.grad

    return prop


def test_property_holds_for_the_reference_mgiou():
    finite_for_degenerate_families(mgiou)()


@pytest.mark.parametrize("mutant", [mutants.mgiou_tiny_eps, mutants.mgiou_nan_times_zero], ids=lambda f: f.__name__)
def test_property_fails_for_the_mutants(mutant):
    with pytest.raises(AssertionError):
        finite_for_degenerate_families(mutant)()


@pytest.mark.parametrize("family", ["all_equal", "repeated_vertex", "zero_width", "all_zero"])
def test_symptom_eps_1e9_is_zero_in_fp16(family):
    assert torch.tensor(1e-9, dtype=torch.float16) == 0
    assert _finite_loss_and_grad(mutants.mgiou_tiny_eps, *_pair(family, torch.float32))
    assert not _finite_loss_and_grad(mutants.mgiou_tiny_eps, *_pair(family, torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["all_equal", "repeated_vertex", "zero_width", "all_zero"])
def test_symptom_nan_times_zero_is_nan_in_every_dtype(family, dtype):
    pred, target = _pair(family, dtype)
    assert bool(torch.isnan(mutants.mgiou_nan_times_zero(pred, target)).all())


def test_check_fails_on_mutant_inside_the_polygon_loss():
    """PolygonLoss(mode="mgiou") computes in float32, so there the NaN * 0 variant is the one that bites."""
    assert "on degenerate targets" in mutants.failure_message(mutants.R6_SPEC, CHECK)


@pytest.mark.parametrize("spec_name", ["REFERENCE", "REFERENCE_MGIOU"])
def test_check_passes_on_reference(spec_name):
    mutants.assert_passes(getattr(mutants, spec_name), CHECK)
