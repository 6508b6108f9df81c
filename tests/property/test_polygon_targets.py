"""Polygon targets: padding is masked, resampling is a documented, bounded rule, per-anchor targets use own strides."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from headguard import strategies as hs
from losses import LossInputError, assigned_polygon_targets, polygons_to_targets, resample_polygon
from tests._polygon_iou import polygon_iou, signed_area


def perimeter(v: torch.Tensor) -> float:
    return float((v.double().roll(-1, 0) - v.double()).norm(dim=1).sum())


def distance_to_boundary(points: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Distance of each point (K, 2) to the nearest edge of the closed polygon v (V, 2)."""
    p, a = points.double()[:, None], v.double()[None]
    ab = a.roll(-1, 1) - a
    t = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-300)  # test helper: a point-to-segment projection
    foot = a + t.clamp(0, 1)[..., None] * ab
    return (p - foot).norm(dim=-1).min(dim=1).values


def convex_polygons(*, min_vertices: int = 3, max_vertices: int = 32):
    """Strictly convex polygons (V, 2) float64, either orientation (headguard.strategies.polygons)."""
    return hs.polygons(families=("convex",), min_vertices=min_vertices, max_vertices=max_vertices)


@given(convex_polygons(min_vertices=4), st.integers(3, 12))
def test_resample_stays_on_boundary_starts_at_vertex_0(v, np):
    out = resample_polygon(v, np)
    assert out.shape == (np, 2) and out.dtype == v.dtype
    torch.testing.assert_close(out[0], v[0])
    scale = float(v.abs().max()) + 1.0
    assert float(distance_to_boundary(out, v).max()) <= 1e-9 * scale


@given(convex_polygons(min_vertices=4), st.integers(3, 12))
def test_resample_area_bound_for_convex_inputs(v, np):
    # Output points lie on the convex input's boundary in order, so the output is contained in the input, has the
    # same orientation, and IoU(output, input) = area(output) / area(input) >= 1 - P^2 / (2 pi np A) (Dido).
    a, p = signed_area(v.numpy()), perimeter(v)
    out_area = signed_area(resample_polygon(v, np).numpy()) * math.copysign(1.0, a)
    tol = 1e-9 * (abs(a) + p * p)
    assert out_area <= abs(a) + tol
    assert out_area >= abs(a) - p * p / (2 * math.pi * np) - tol


@given(convex_polygons(min_vertices=9, max_vertices=40), st.sampled_from([4, 8, 12]))
def test_resample_iou_with_original_is_bounded_for_convex_inputs(v, np):
    a, p = abs(signed_area(v.numpy())), perimeter(v)
    iou = polygon_iou(resample_polygon(v, np).numpy(), v.numpy())
    assert iou >= 1 - p * p / (2 * math.pi * np * a) - 1e-9


def test_resample_recovers_equilateral_polygon_from_inserted_midpoints():
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    with_midpoints = torch.stack([square, (square + square.roll(-1, 0)) / 2], 1).reshape(8, 2)
    torch.testing.assert_close(resample_polygon(with_midpoints, 4), square)
    torch.testing.assert_close(resample_polygon(square, 8), with_midpoints)


def test_resample_skips_repeated_vertices():
    v = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]])
    torch.testing.assert_close(resample_polygon(v, 4), v[[0, 2, 4, 5]])


@given(st.lists(convex_polygons(min_vertices=3, max_vertices=14), min_size=0, max_size=5), st.integers(3, 10))
def test_polygons_to_targets_pads_masks_or_resamples(polys, np):
    out, mask = polygons_to_targets(polys, np)
    assert out.shape == (len(polys), np, 2) and out.dtype == torch.float32
    assert mask.shape == (len(polys), np) and mask.dtype == torch.bool
    for i, v in enumerate(polys):
        n = v.shape[0]
        if n <= np:
            assert mask[i].tolist() == [True] * n + [False] * (np - n)  # padding is never counted as real
            torch.testing.assert_close(out[i, :n], v.float())
            torch.testing.assert_close(out[i, n:], v[-1].float().expand(np - n, 2))
        else:
            assert bool(mask[i].all())
            torch.testing.assert_close(out[i], resample_polygon(v, np).float())


def test_polygons_to_targets_accepts_nested_lists_and_dtype():
    out, mask = polygons_to_targets([[[0, 0], [1, 0], [0, 1]]], 4, dtype=torch.float64)
    assert out.dtype == torch.float64 and mask.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize(
    ("polygons", "np", "match"),
    [
        ([[[0, 0], [1, 0], [0, 1]]], 2, "np is 2; expected an int >= 3"),
        ([[[0, 0], [1, 0], [0, 1]]], 4.0, "np is 4.0; expected an int >= 3"),
        ([[[0, 0], [1, 0]]], 4, r"polygons\[0\] has 2 vertices; expected at least 3"),
        ([[[0, 0, 0], [1, 0, 0], [0, 1, 0]]], 4, r"polygons\[0\] has shape \(3, 3\); expected \(V, 2\)"),
        ([[[0, 0], [1, 0], [0, 1]], [[0, 0], [float("nan"), 0], [0, 1]]], 4, r"polygons\[1\] has 1 non-finite coordinates; expected finite ones"),
        ([[[1, 1]] * 5], 4, "vertices has every vertex equal; expected a polygon with a positive perimeter"),
        ([["a", "b"], ["c", "d"], ["e", "f"]], 4, r"polygons\[0\] is a list that does not convert to a tensor .*; expected a \(V, 2\) array"),
        ("abc", 4, "polygons is a str; expected a sequence of"),
    ],
)
def test_polygons_to_targets_rejects_bad_input(polygons, np, match):
    with pytest.raises(LossInputError, match=match):
        polygons_to_targets(polygons, np)


@given(st.data())
def test_assigned_targets_use_own_image_slots_and_own_stride(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    b, v = data.draw(st.integers(1, 3)), data.draw(st.integers(3, 6))
    image_of_row = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=8))
    # Per-image slots in order of appearance, as DetectionTargets.gt_rows lays them out.
    slots = [[r for r, im in enumerate(image_of_row) if im == i] for i in range(b)]
    n = max(len(s) for s in slots)
    gt_rows = torch.tensor([s + [-1] * (n - len(s)) for s in slots])
    strides = torch.tensor([8.0] * 6 + [16.0] * 3 + [32.0] * 2)[:, None]
    a = strides.shape[0]
    polygons = torch.rand(len(image_of_row), v, 2, generator=gen) * 640
    mask = torch.rand(len(image_of_row), v, generator=gen) > 0.3
    idx = torch.stack([torch.randint(0, max(1, len(s)), (a,), generator=gen) for s in slots])
    fg = (torch.rand(b, a, generator=gen) > 0.5) & torch.tensor([len(s) > 0 for s in slots])[:, None]
    targets, target_mask, rows = assigned_polygon_targets(polygons, mask, gt_rows, idx, fg, strides)
    positives = [(i, j) for i in range(b) for j in range(a) if fg[i, j]]
    assert targets.shape == (len(positives), v, 2) and target_mask.shape == (len(positives), v)
    for k, (i, j) in enumerate(positives):
        row = slots[i][int(idx[i, j])]  # slot idx of image i's own objects, never flat row idx (R5)
        assert int(rows[k]) == row
        assert torch.equal(targets[k], polygons[row] / strides[j])
        assert torch.equal(target_mask[k], mask[row])
