"""R2 — cv4's final weights zeroed at init as well as its bias: every decoded vertex of every polygon is the same
point at step 0, a stationary point of MGIoU-style losses (zero gradient) and a 0/0 for unguarded ones."""

from __future__ import annotations

import pytest
import torch

import heads
import mutants
from losses.mgiou import mgiou


def _initial_vertices(head_cls) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-decoded vertices (B*A, np, 2) of a fresh head, and its anchor centres (B*A, 2), in pixels."""
    head = head_cls(nc=2, ch=mutants.CHANNELS)
    head.stride = torch.tensor(mutants.STRIDES)
    head.bias_init()
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s), generator=gen) for c, s in zip(head.ch, mutants.STRIDES)]
    head.eval()
    with torch.no_grad():
        y, _ = head(feats)
    b, _, a = y.shape
    vertices = y[:, 4 + head.nc :].reshape(b, head.np, 2, a).permute(0, 3, 1, 2).reshape(b * a, head.np, 2)
    return vertices, y[:, :2].permute(0, 2, 1).reshape(b * a, 2)


def _mgiou_gradient(vertices: torch.Tensor, centres: torch.Tensor, loss_fn) -> torch.Tensor:
    """d loss / d vertices towards a square target of side 32 px around each anchor's decoded box centre."""
    square = torch.tensor([[-16.0, -16.0], [16.0, -16.0], [16.0, 16.0], [-16.0, 16.0]])
    target = centres[:, None, :] + square[None]
    pred = vertices.clone().requires_grad_(True)
    loss_fn(pred, target).sum().backward()
    return pred.grad


def test_symptom_every_vertex_is_one_point():
    vertices, _ = _initial_vertices(mutants.PolygonZeroedVertexWeights)
    assert float((vertices - vertices[:, :1]).abs().max()) == 0.0


def test_symptom_mgiou_gradient_is_zero_at_init():
    vertices, centres = _initial_vertices(mutants.PolygonZeroedVertexWeights)
    # A one-point polygon inside its target: on every axis its projection is a point inside the target's interval,
    # so the overlap is 0 whatever the point, and the hull is the target's: a stationary point.
    inside = ((vertices[:, 0] - centres).abs() < 16).all(1)
    assert bool(inside.any())
    grad = _mgiou_gradient(vertices[inside], centres[inside], mgiou)
    assert float(grad.abs().max()) == 0.0


def test_symptom_unguarded_mgiou_is_nan_at_init():
    vertices, centres = _initial_vertices(mutants.PolygonZeroedVertexWeights)
    square = torch.tensor([[-16.0, -16.0], [16.0, -16.0], [16.0, 16.0], [-16.0, 16.0]])
    # The collapsed polygon's edges are zero, so are their normals: both projections on them are 0, and 0/0.
    assert bool(torch.isnan(mutants.mgiou_nan_times_zero(vertices, centres[:, None] + square[None])).all())


def test_reference_polygons_have_spread_and_gradient():
    vertices, centres = _initial_vertices(heads.Polygon)
    spread = (vertices - vertices.mean(1, keepdim=True)).norm(dim=-1).amax(1)
    assert bool((spread > 0).all())
    grad = _mgiou_gradient(vertices, centres, mgiou)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


FAILS = [
    ("R2_SPEC", "check_final_convs_initialised", "is all zeros at init"),
    ("R2_SPEC", "check_initial_predictions_sane", "initial polygons are degenerate"),
    ("R2_SPEC", "check_every_parameter_gets_gradient", "all-zero gradient"),
    # With the reference MGIoU the total gradient is not zero (a collapsed polygon OUTSIDE its target still gets
    # one), so the gradient check catches R2 through the unguarded loss's 0/0.
    ("R2_UNGUARDED_SPEC", "check_polygon_gradient_at_init", "non-finite"),
]


@pytest.mark.parametrize(("spec_name", "check_name", "phrase"), FAILS)
def test_check_fails_on_mutant(spec_name, check_name, phrase):
    assert phrase in mutants.failure_message(getattr(mutants, spec_name), check_name)


@pytest.mark.parametrize("spec_name", ["REFERENCE", "REFERENCE_MGIOU"])
@pytest.mark.parametrize("check_name", [name for _, name, _ in FAILS])
def test_check_passes_on_reference(spec_name, check_name):
    mutants.assert_passes(getattr(mutants, spec_name), check_name)
