"""MGIoU: marginalised generalised IoU for convex polygons and boxes (Le et al., arXiv 2504.16443).

Two shapes are projected onto the edge normals of both; on each axis the two projections are intervals and their
1-D GIoU is ``(min(hi_p, hi_t) - max(lo_p, lo_t)) / (max(hi_p, hi_t) - min(lo_p, lo_t))`` (overlap over hull; for
disjoint intervals the numerator is minus the gap, which is exactly GIoU's penalty). MGIoU is the mean over the
valid axes, in [-1, 1]; the loss is ``(1 - MGIoU) / 2``, in [0, 1]. MGIoU+ adds a convexity term for predicted
polygons (`convexity_loss`).

Conventions shared by every function here:

- Arithmetic runs in float32 for float16 / bfloat16 / float32 input and in float64 for float64 input, and results
  are returned in that compute dtype (never in float16: a loss near 0 would lose its resolution).
- Before any threshold is applied, each pair is centred and divided by its joint extent (the longer side of the
  bounding box of both shapes). The loss is exactly translation and scale invariant, so this changes nothing but
  conditioning, and the statistics are detached (their true gradient is zero). Thresholds below are relative to it.
- Padded vertices (mask False) are replaced by the nearest real vertex before them in cyclic order, so a padded
  polygon has the same edges as the polygon of its real vertices plus zero-length ones, which are then deselected.
  A padded vertex therefore changes nothing, and receives zero gradient.
- Degenerate operands are removed by selection (`torch.where` choosing a safe denominator) before each division,
  never by multiplying a NaN by zero: loss and gradients stay finite for repeated, collinear or coincident vertices.
  Gradients scale like 1 / extent (the loss is scale invariant), so they are finite while that is representable.
- Non-finite coordinates of a real vertex raise `LossInputError` (``check_finite=False`` skips this check and, where
  no mask is given, the device sync it costs). On CUDA one small kernel flags them, and empty masks, ahead of the
  MGIoU kernel; `mgiou` reads that flag once and words the error from the checks here.
"""

from __future__ import annotations

import torch

from losses import _kernels
from losses._kernels import spec
from losses._validate import LossInputError

__all__ = ["box_corners", "convexity_loss", "mgiou", "mgiou_boxes"]

# Both are relative to the pair's extent and representable in float32 (their squares, 1e-12, are what is compared).
EDGE_EPS = 1e-6  # an edge shorter than this is zero-length: it gives no axis and no turn
SPREAD_EPS = 1e-6  # an axis on which both shapes project into an interval shorter than this is dropped

BOX_FORMATS = {"xyxy": 4, "xywhr": 5}


# ---------------------------------------------------------------------------------------------------------- checks
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_vertices(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise LossInputError(f"{name} is a {type(x).__name__}; expected a torch.Tensor of shape (N, V, 2)")
    if x.ndim != 3 or x.shape[-1] != 2 or x.shape[1] < 1:
        raise LossInputError(f"{name} has shape {tuple(x.shape)}; expected (N, V, 2) with V >= 1")
    if not x.is_floating_point():
        raise LossInputError(f"{name} has dtype {x.dtype}; expected a floating-point tensor")


def _check_mask(mask, name: str, vertices: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        found = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LossInputError(f"{name} is {found}; expected a bool tensor (True = real vertex)")
    if mask.shape != vertices.shape[:2]:
        raise LossInputError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(vertices.shape[:2])} "
                             "(one flag per vertex)")
    if mask.device != vertices.device:
        raise LossInputError(f"{name} is on {mask.device}; expected {vertices.device}, the device of the vertices")


def _check_values(named: dict[str, tuple[torch.Tensor, str, torch.Tensor | None]], check_finite: bool) -> None:
    """One device sync for all value checks (name -> (vertices, mask name, mask)); the slow path words the error."""
    flags = []
    for vertices, _, mask in named.values():
        if check_finite:
            flags.append(spec.real_finite(vertices, mask).all())
        if mask is not None:
            flags.append(mask.any(dim=1).all())
    if not flags or bool(torch.stack(flags).all()):
        return
    for name, (vertices, mask_name, mask) in named.items():
        if check_finite and not bool(spec.real_finite(vertices, mask).all()):
            bad = int((~spec.real_finite(vertices, mask)).sum())
            raise LossInputError(f"{name} has {bad} real vertex(es) with a non-finite coordinate; expected finite "
                                 "coordinates for every real vertex (non-finite predictions are never replaced silently)")
        if mask is not None and not bool(mask.any(dim=1).all()):
            rows = torch.nonzero(~mask.any(dim=1)).flatten()[:5].tolist()
            raise LossInputError(f"{mask_name} has no real vertex in rows {rows}; expected at least one real "
                                 "vertex per polygon")


def _check_pair(pred, target, pred_mask, target_mask) -> None:
    """The structural checks of a pair: types, shapes, dtypes, devices (no device sync)."""
    _check_vertices(pred, "pred")
    _check_vertices(target, "target")
    if pred.shape[0] != target.shape[0]:
        raise LossInputError(f"pred has {pred.shape[0]} shapes and target {target.shape[0]}; expected the same "
                             "number N")
    if pred.device != target.device:
        raise LossInputError(f"target is on {target.device}; expected {pred.device}, the device of pred")
    _check_mask(pred_mask, "pred_mask", pred)
    _check_mask(target_mask, "target_mask", target)


def _check_flagged_values(named: dict[str, tuple[torch.Tensor, str, torch.Tensor | None]],
                          check_finite: bool) -> None:
    """`_check_values` where the MGIoU kernels run: one small kernel flags every problem (`_kernels.mgiou_problems`),
    read before the loss kernel is queued, so the host waits for that read only; the slow path words the error."""
    (pred, _, pred_mask), (target, _, target_mask) = named["pred"], named["target"]
    wanted = _problem_bits(check_finite, pred_mask, target_mask)
    if wanted and _kernels.mgiou_problems(pred, target, pred_mask, target_mask) & wanted:
        _check_values(named, check_finite)
        raise RuntimeError("the MGIoU kernel flagged an input problem that the value checks do not find")


def _problem_bits(check_finite: bool, pred_mask, target_mask) -> int:
    """The `losses._kernels.spec.mgiou_problems` bits the value checks of `mgiou` ask about."""
    bits = (spec.MGIOU_PRED_NONFINITE | spec.MGIOU_TARGET_NONFINITE) if check_finite else 0
    bits |= spec.MGIOU_PRED_EMPTY if pred_mask is not None else 0
    return bits | (spec.MGIOU_TARGET_EMPTY if target_mask is not None else 0)


# ------------------------------------------------------------------------------------------------------- geometry
def _fill_padded(vertices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Replace each padded vertex by the nearest real vertex before it, cyclically (leading pads take the last)."""
    if mask is None:
        return vertices
    index = torch.arange(vertices.shape[1], device=vertices.device).expand_as(mask)
    last_real = torch.where(mask, index, -1).cummax(dim=1).values
    source = torch.where(last_real >= 0, last_real, last_real[:, -1:])
    return torch.gather(vertices, 1, source.unsqueeze(-1).expand(-1, -1, 2))


def _normalise(*shapes: torch.Tensor) -> list[torch.Tensor]:
    """Centre the shapes on their joint bounding box and divide by its longer side (statistics detached)."""
    joint = torch.cat(shapes, dim=1).detach()
    low, high = joint.amin(dim=1, keepdim=True), joint.amax(dim=1, keepdim=True)
    centre = (low + high) / 2
    extent = (high - low).amax(dim=-1, keepdim=True)
    # All points coincide: any positive scale gives the same (all-zero) coordinates.
    scale = torch.where(extent > 0, extent, torch.ones_like(extent))
    return [(s - centre) / scale for s in shapes]


def _prepare(vertices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _fill_padded(vertices.to(_compute_dtype(vertices)), mask)


def _edges(vertices: torch.Tensor) -> torch.Tensor:
    """Edge i goes from vertex i to vertex i + 1 (cyclically)."""
    return torch.roll(vertices, shifts=-1, dims=1) - vertices


# ---------------------------------------------------------------------------------------------------------- MGIoU
def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Spelled out: a sum over a size-2 dimension is a slow reduction kernel, two products and a sum are not.
    return u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]


def _support(vertices: torch.Tensor, axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest projection (N, A) of vertices (N, V, 2) on axes (N, A, 2).

    Projecting every vertex is done without autograd, only to find the extreme vertices; the extremes are then
    recomputed from those vertices, so backward costs O(N * A) instead of O(N * A * V). Values are those of
    amin/amax; so are gradients wherever the extreme vertex is unique (at a tie one vertex takes all of it).
    """
    with torch.no_grad():
        if vertices.is_cuda:  # (N, V, A): CUDA reduces over a middle dimension faster (1.7 vs 2.2 ms, H200)
            proj = torch.bmm(vertices, axes.transpose(1, 2))
            lowest, highest = proj.argmin(dim=1), proj.argmax(dim=1)
        else:  # (N, A, V): the CPU reduces over the last dimension faster
            proj = torch.bmm(axes, vertices.transpose(1, 2))
            # argmin/argmax, not min(dim).indices: the latter took milliseconds on tiny CPU inputs (torch 2.13).
            lowest, highest = proj.argmin(dim=-1), proj.argmax(dim=-1)
    low = torch.gather(vertices, 1, lowest.unsqueeze(-1).expand(-1, -1, 2))
    high = torch.gather(vertices, 1, highest.unsqueeze(-1).expand(-1, -1, 2))
    return _dot(low, axes), _dot(high, axes)


def _mgiou_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MGIoU in [-1, 1] of filled, normalised shapes (N, Vp, 2) and (N, Vt, 2)."""
    n = pred.shape[0]
    edges = torch.cat((_edges(pred), _edges(target)), dim=1)
    normals = torch.stack((-edges[..., 1], edges[..., 0]), dim=-1)
    normal_sq = _dot(normals, normals)
    # x and y are only used when no edge normal is valid (both shapes points, or on one common line).
    fallback = torch.eye(2, dtype=pred.dtype, device=pred.device).expand(n, 2, 2)
    axes = torch.cat((normals, fallback), dim=1)
    axis_sq = torch.cat((normal_sq, torch.ones_like(normal_sq[:, :2])), dim=1)

    p_lo, p_hi = _support(pred, axes)
    t_lo, t_hi = _support(target, axes)
    overlap = torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo)
    # max(hi) - min(lo), written with the overlap because min(a, b) + max(a, b) = a + b: two fewer kernels.
    hull = (p_hi - p_lo) + (t_hi - t_lo) - overlap
    # Axes are not unit vectors: compare hull / |axis| with SPREAD_EPS, without a square root.
    spread = hull * hull > (SPREAD_EPS * SPREAD_EPS) * axis_sq

    n_edge_axes = normals.shape[1]
    edge_valid = (normal_sq > EDGE_EPS * EDGE_EPS) & spread[:, :n_edge_axes]
    no_edge_axis = ~edge_valid.any(dim=1, keepdim=True)
    valid = torch.cat((edge_valid, spread[:, n_edge_axes:] & no_edge_axis), dim=1)

    safe_hull = torch.where(valid, hull, torch.ones_like(hull))
    giou = torch.where(valid, overlap / safe_hull, torch.zeros_like(hull))
    count = valid.sum(dim=1)
    mean = giou.sum(dim=1) / count.clamp(min=1).to(giou.dtype)
    # No valid axis at all: every point of both shapes coincides, so the shapes are equal.
    return torch.where(count > 0, mean, torch.ones_like(mean))


def mgiou(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None = None,
          target_mask: torch.Tensor | None = None, *, check_finite: bool = True) -> torch.Tensor:
    """MGIoU loss ``(1 - MGIoU) / 2`` in [0, 1] of convex polygons, one value per pair.

    Args:
        pred: (N, Vp, 2) vertices in order (clockwise or counter-clockwise, any start; float16/bfloat16/32/64).
        target: (N, Vt, 2) vertices, same conventions.
        pred_mask, target_mask: optional (N, V) bool, True = real vertex; each polygon needs one real vertex.
        check_finite: raise `LossInputError` on non-finite coordinates (one device sync).

    Returns:
        (N,) loss in float32 (float64 for float64 input); 0 when the convex hulls coincide (and, for convex
        vertex orders, only then). An empty batch (N = 0) gives an empty result.

    The axes are the normals of every non-zero edge of both polygons, in the given vertex order; vertices whose
    order is not convex still project correctly (a projection only sees the convex hull), but they bring wrong
    axes, which `convexity_loss` penalises. Unlike the paper's reference code, parallel normals are not merged:
    each edge contributes one axis (for boxes this weights both directions equally, as merging would).
    An axis is dropped when both shapes project into a point on it (relative extent below `SPREAD_EPS`). If no
    edge normal survives (both shapes single points, or both on one line), the x and y axes are used instead; if
    none of those survives either, every point coincides and the loss is 0.

    Stationary points: a prediction collapsed to a single point strictly inside a non-degenerate target has no axis
    of its own and projects inside the target's interval on every target axis, where the 1-D GIoU is exactly 0:
    the loss is 1/2 and its gradient is zero (up to rounding: on each axis the same vertex receives +g*n through the
    interval's upper end and -g*n through its lower end). R2: a head must not start there. Two distinct single
    points give loss 1 with zero gradient likewise.
    """
    _check_pair(pred, target, pred_mask, target_mask)
    named = {"pred": (pred, "pred_mask", pred_mask), "target": (target, "target_mask", target_mask)}
    if _kernels.mgiou_runs(pred, target):
        _check_flagged_values(named, check_finite)
    else:
        _check_values(named, check_finite)
    return _mgiou_loss(pred, target, pred_mask, target_mask)


def _mgiou_loss(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`mgiou` without its input checks, for callers whose inputs are checked already (the losses' fast path)."""
    if _kernels.mgiou_runs(pred, target):  # CUDA: one fused kernel each way, the same values (losses._kernels)
        return _kernels.mgiou_loss(pred, target, pred_mask, target_mask)
    p, t = _normalise(_prepare(pred, pred_mask), _prepare(target, target_mask))
    return (1 - _mgiou_similarity(p, t)) / 2


# ------------------------------------------------------------------------------------------------------ convexity
def _turn_sines(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine of the turn between each non-zero edge and the next non-zero edge (N, V), and which turns exist."""
    edge_sq = _dot(edges, edges)
    nonzero = edge_sq > EDGE_EPS * EDGE_EPS
    # Compact the non-zero edges to the front, keeping their cyclic order, so repeated vertices change nothing.
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)
    count = nonzero.sum(dim=1, keepdim=True)
    slot = torch.arange(edges.shape[1], device=edges.device).expand_as(order)
    following = torch.where(slot + 1 < count, slot + 1, torch.zeros_like(slot))
    this_edge = torch.gather(edges, 1, order.unsqueeze(-1).expand_as(edges))
    next_edge = torch.gather(this_edge, 1, following.unsqueeze(-1).expand_as(edges))
    this_sq, next_sq = torch.gather(edge_sq, 1, order), torch.gather(edge_sq, 1, torch.gather(order, 1, following))
    exists = slot < count
    cross = this_edge[..., 0] * next_edge[..., 1] - this_edge[..., 1] * next_edge[..., 0]
    norm = torch.sqrt(torch.where(exists, this_sq * next_sq, torch.ones_like(this_sq)))
    return torch.where(exists, cross / norm, torch.zeros_like(cross)), exists


def convexity_loss(polygons: torch.Tensor, mask: torch.Tensor | None = None, *,
                   check_finite: bool = True) -> torch.Tensor:
    """MGIoU+'s convexity term, made scale invariant: per polygon, in [0, 1], 0 iff every turn has one sign.

    The paper penalises each vertex whose cross product of consecutive edges has the sign opposite to the polygon's
    orientation, ``relu(-s * cross)``, averaged over vertices. Cross products scale with area, so here each is divided
    by the two edge lengths: the penalty of a vertex is the sine of its wrong-way turn. The orientation ``s`` is the
    sign of the signed (shoelace) area, not that of the first vertex, so the term does not depend on where the
    vertex list starts or on its direction. Zero-length edges (repeated or padded vertices) are skipped: the turn is
    measured to the next non-zero edge. A reversal of direction (a 180 degree spike) has sine 0 and is not penalised.

    Args:
        polygons: (N, V, 2) predicted vertices. mask: optional (N, V) bool, True = real vertex.

    Returns:
        (N,) penalty in float32 (float64 for float64 input), the mean over the polygon's turns (0 without turns).
    """
    _check_vertices(polygons, "polygons")
    _check_mask(mask, "mask", polygons)
    _check_values({"polygons": (polygons, "mask", mask)}, check_finite)
    (v,) = _normalise(_prepare(polygons, mask))
    sines, exists = _turn_sines(_edges(v))
    following = torch.roll(v, shifts=-1, dims=1)
    twice_area = (v[..., 0] * following[..., 1] - following[..., 0] * v[..., 1]).sum(dim=1, keepdim=True)
    orientation = torch.where(twice_area >= 0, 1.0, -1.0).to(v.dtype)
    penalty = torch.where(exists, torch.relu(-orientation * sines), torch.zeros_like(sines))
    return penalty.sum(dim=1) / exists.sum(dim=1).clamp(min=1).to(v.dtype)


# ---------------------------------------------------------------------------------------------------------- boxes
def box_corners(boxes: torch.Tensor, fmt: str = "xyxy") -> torch.Tensor:
    """The 4 corners (..., 4, 2) of boxes (..., 4) in ``xyxy`` or (..., 5) in ``xywhr`` (r in radians).

    Order: (x1, y1), (x2, y1), (x2, y2), (x1, y2) for ``xyxy``, i.e. positive shoelace area: clockwise as seen on
    an image whose y axis points down. ``xywhr`` uses the same order on the box rotated by r about its centre, with
    the w side along (cos r, sin r) and the h side along (-sin r, cos r) (the Ultralytics OBB convention); r = 0
    gives exactly the ``xyxy`` corners. Computed and returned in float32 (float64 for float64 input).
    """
    if fmt not in BOX_FORMATS:
        raise LossInputError(f"fmt is {fmt!r}; expected one of {sorted(BOX_FORMATS)}")
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
        found = boxes.dtype if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise LossInputError(f"boxes is {found}; expected a floating-point torch.Tensor")
    if boxes.ndim < 1 or boxes.shape[-1] != BOX_FORMATS[fmt]:
        raise LossInputError(f"boxes has shape {tuple(boxes.shape)}; expected (..., {BOX_FORMATS[fmt]}) for "
                             f"fmt={fmt!r}")
    b = boxes.to(_compute_dtype(boxes))
    if fmt == "xyxy":
        x1, y1, x2, y2 = b.unbind(-1)
        return torch.stack((torch.stack((x1, y1), -1), torch.stack((x2, y1), -1),
                            torch.stack((x2, y2), -1), torch.stack((x1, y2), -1)), dim=-2)
    cx, cy, w, h, r = b.unbind(-1)
    cos, sin = torch.cos(r), torch.sin(r)
    half_w = torch.stack((w * cos, w * sin), -1) / 2
    half_h = torch.stack((-h * sin, h * cos), -1) / 2
    centre = torch.stack((cx, cy), -1)
    return torch.stack((centre - half_w - half_h, centre + half_w - half_h,
                        centre + half_w + half_h, centre - half_w + half_h), dim=-2)


def mgiou_boxes(pred: torch.Tensor, target: torch.Tensor, fmt: str = "xyxy", *,
                check_finite: bool = True) -> torch.Tensor:
    """MGIoU loss (N,) of boxes (N, 4) ``xyxy`` or (N, 5) ``xywhr``: `mgiou` on their `box_corners`."""
    return mgiou(box_corners(pred, fmt), box_corners(target, fmt), check_finite=check_finite)
