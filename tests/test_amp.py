"""Mixed precision: under `torch.autocast("cuda", dtype=torch.float16)` the default loss (on CUDA the fast path, its
core run eagerly under autocast, with the fused kernels) equals the eager reference (`cuda_graphs=False`) under the
same autocast: loss vector and every gradient within 1e-5 relative (plus one rounding for float16 gradients), for
DetectionLoss and PolygonLoss (l2, mgiou), with float32 head outputs (autocast around the loss alone) and float16
ones (a head run under autocast).
GPU only (`cuda` marker): without CUDA these tests are skipped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._inputs import STRIDES, loss_shape, make_batch, make_preds
from losses import DetectionLoss, PolygonLoss
from tests.test_kernels import NC_LOSS, loss_batches

TOL = 1e-5
MODES = ("detection", "l2", "mgiou")


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().item()
    diff = (actual.double() - expected.double()).norm().item()
    return diff if scale == 0 else diff / scale


def _criteria(mode: str, nc: int, np: int):
    """(eager reference, default) for one mode."""
    if mode == "detection":
        return DetectionLoss(nc, STRIDES, cuda_graphs=False), DetectionLoss(nc, STRIDES)
    return (PolygonLoss(nc, STRIDES, np=np, mode=mode, cuda_graphs=False),
            PolygonLoss(nc, STRIDES, np=np, mode=mode))


def _autocast_loss_and_grads(criterion, preds: dict, batch: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    leaves = {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in preds.items() if k != "feats"}
    inputs = {**leaves, "feats": [f.to("cuda") for f in preds["feats"]]}
    with torch.autocast("cuda", dtype=torch.float16):
        loss, _ = criterion(inputs, {k: v.to("cuda") for k, v in batch.items()})
        loss.sum().backward()
    grads = [leaves[k].grad for k in ("boxes", "scores", "polygons") if k in leaves and leaves[k].grad is not None]
    return [loss.detach(), *grads]


def _check(mode: str, preds: dict, batch: dict, dtype: torch.dtype, nc: int, np: int) -> None:
    reference, default = _criteria(mode, nc, np)
    expected = _autocast_loss_and_grads(reference, preds, batch, dtype)
    got = _autocast_loss_and_grads(default, preds, batch, dtype)
    assert default._fast is not None, "the default did not take the fast path on CUDA"
    assert len(got) == len(expected)
    for i, (actual, want) in enumerate(zip(got, expected)):
        assert actual.dtype == want.dtype, f"{mode}, output {i}: dtype {actual.dtype} != {want.dtype}"
        assert bool(torch.isfinite(actual).all()), f"{mode}, output {i}: not finite"
        # Both compute in float32 (within TOL); a float16 gradient is then rounded once more, which may flip an
        # element by one ulp where summation order differed: up to half its machine epsilon, relative.
        bound = TOL + (torch.finfo(actual.dtype).eps / 2 if actual.dtype != torch.float32 else 0.0)
        assert _rel(actual, want) <= bound, f"{mode}, output {i}: relative difference {_rel(actual, want):.2e}"


@pytest.mark.cuda
@settings(max_examples=25)
@given(loss_batches(), st.sampled_from([torch.float32, torch.float16]))
def test_default_equals_eager_reference_under_autocast(case, dtype):
    preds, batch = case
    for mode in MODES:
        _check(mode, preds, batch, dtype, NC_LOSS, 6)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
def test_default_equals_eager_reference_under_autocast_at_benchmark_shapes(shape_name, mode):
    shape = loss_shape(shape_name, "cuda")
    preds, batch = make_preds(shape, "cuda"), make_batch(shape, "cuda")
    _check(mode, preds, batch, torch.float32, shape.nc, shape.np)
