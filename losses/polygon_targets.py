"""Polygon targets: from vertex lists to the batch layout, and from the batch to one target per positive anchor.

Batch layout (see docs/architecture.md): `polygons (N, np, 2)` normalised xy in [0, 1] of the image and an optional
`polygon_mask (N, np)` bool, True for real vertices. A polygon with fewer than `np` vertices is padded AND masked; a
polygon with more is resampled to `np` vertices (`resample_polygon`): nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from losses._validate import LossInputError

__all__ = [
    "MIN_VERTICES",
    "assigned_polygon_targets",
    "polygons_to_targets",
    "resample_polygon",
]

MIN_VERTICES = 3  # fewer real vertices span no area: no polygon loss can score them


def _check_num_vertices(np: int) -> None:
    if isinstance(np, bool) or not isinstance(np, int) or np < MIN_VERTICES:
        raise LossInputError(f"np is {np!r}; expected an int >= {MIN_VERTICES} (vertices per polygon)")


def _as_vertices(vertices, name: str) -> torch.Tensor:
    """One polygon as a float64 (V, 2) tensor, or a clear error."""
    try:
        v = torch.as_tensor(vertices, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise LossInputError(f"{name} is a {type(vertices).__name__} that does not convert to a tensor ({err}); "
                             "expected a (V, 2) array of vertex coordinates") from None
    if v.ndim != 2 or v.shape[1] != 2:
        raise LossInputError(f"{name} has shape {tuple(v.shape)}; expected (V, 2)")
    if v.shape[0] < MIN_VERTICES:
        raise LossInputError(f"{name} has {v.shape[0]} vertices; expected at least {MIN_VERTICES}")
    if not torch.isfinite(v).all():
        raise LossInputError(f"{name} has {int((~torch.isfinite(v)).sum())} non-finite coordinates; expected finite ones")
    return v


def resample_polygon(vertices: torch.Tensor, np: int) -> torch.Tensor:
    """Resample a closed polygon (V, 2) to `np` points at equal steps along its perimeter, starting at vertex 0.

    Point k lies at arc length k * P / np from vertex 0, walking the edges in the given order (the closing edge
    last), so every output point lies on the original boundary and the orientation is kept. For a convex input the
    output polygon is contained in it and, by Dido's inequality on each of the np arcs of length P / np,
    area(output) >= area(input) - P**2 / (2 * pi * np). Computed in float64, returned in the input's dtype.
    Raises LossInputError for a polygon of zero perimeter (every vertex the same point).
    """
    _check_num_vertices(np)
    v = _as_vertices(vertices, "vertices")
    edges = v.roll(-1, dims=0) - v
    lengths = edges.norm(dim=1)
    cum = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    perimeter = cum[-1]
    if not perimeter > 0:
        raise LossInputError("vertices has every vertex equal; expected a polygon with a positive perimeter")
    arc = torch.arange(np, dtype=torch.float64) * (perimeter / np)
    # right=True picks, for each arc position, the last edge starting at or before it: never a zero-length edge.
    edge = torch.searchsorted(cum, arc, right=True) - 1
    frac = (arc - cum[edge]) / lengths[edge]
    out = v[edge] + frac[:, None] * edges[edge]
    dtype = vertices.dtype if isinstance(vertices, torch.Tensor) and vertices.is_floating_point() else torch.float32
    return out.to(dtype)


def polygons_to_targets(
    polygons: Sequence, np: int, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex lists (each (V_i, 2), V_i >= 3) -> `(polygons (N, np, 2), polygon_mask (N, np) bool)`.

    V_i == np: kept as is. V_i < np: padded by repeating the last vertex (so even a mask-blind consumer sees the same
    shape) and the padding is masked False. V_i > np: `resample_polygon` to np vertices, all real.
    Coordinates are passed through unchanged (normalise them to [0, 1] of the image for a loss batch).
    """
    _check_num_vertices(np)
    if isinstance(polygons, torch.Tensor) and polygons.ndim == 3:
        polygons = list(polygons)
    if isinstance(polygons, (str, bytes)) or not isinstance(polygons, Sequence):
        raise LossInputError(f"polygons is a {type(polygons).__name__}; expected a sequence of (V, 2) vertex arrays")
    out = torch.zeros(len(polygons), np, 2, dtype=torch.float64)
    mask = torch.zeros(len(polygons), np, dtype=torch.bool)
    for i, vertices in enumerate(polygons):  # data preparation, once per dataset sample: not on the loss path
        v = _as_vertices(vertices, f"polygons[{i}]")
        if v.shape[0] > np:
            v = resample_polygon(v, np)
        n = v.shape[0]
        out[i, :n] = v
        out[i, n:] = v[-1]
        mask[i, :n] = True
    return out.to(dtype), mask


def assigned_polygon_targets(
    polygons: torch.Tensor,
    polygon_mask: torch.Tensor,
    gt_rows: torch.Tensor,
    target_gt_idx: torch.Tensor,
    fg_mask: torch.Tensor,
    stride_tensor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matched ground-truth polygon of every positive anchor, in that anchor's own stride units.

    polygons (N, V, 2) pixels and polygon_mask (N, V) are the flat batch rows. The assigner's target_gt_idx (B, A)
    indexes each image's OWN padded slots, which gt_rows (B, n) maps back to flat rows (`DetectionTargets.gt_rows`);
    using target_gt_idx as a flat row trains image b's anchors towards image 0's objects (R5).
    fg_mask (B, A) bool; stride_tensor (A, 1).
    Returns (targets (P, V, 2), mask (P, V), rows (P,)) for the P positives in `fg_mask.nonzero()` order, which is
    the order of `x[fg_mask]`; rows[k] is the flat batch row of positive k's object.
    """
    image, anchor = fg_mask.nonzero(as_tuple=True)
    rows = gt_rows[image, target_gt_idx[image, anchor]]
    stride = stride_tensor.reshape(-1)[anchor].to(polygons.dtype)
    return polygons[rows] / stride[:, None, None], polygon_mask[rows], rows
