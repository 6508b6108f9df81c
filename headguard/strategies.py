"""Hypothesis strategies for detector heads and shape losses: feature maps, targets, initialisations, compute dtypes
and polygons (single, paired, seeded samples).

Conventions (Hypothesis style): plural nouns for value strategies, `from_head` binds them all to one head,
keyword-only `min_*`/`max_*` pairs, `None` means "derive from the other arguments", and bad arguments raise
`hypothesis.errors.InvalidArgument` naming the argument and its value.

`targets` only produces batches that are VALID input for the reference losses (every box inside the image, positive
or zero extent, classes in range); `invalid_targets` produces batches a loss must reject with a clear error. Keep the
two apart: a check that feeds `targets` expects a finite loss; one that feeds `invalid_targets` expects an error.

Targets of every task, in the layout Ultralytics' collate gives its losses (and `task_targets` for boxes chosen by
hand): polygons `(N, np, 2)`, keypoints `(N, nk, 3)` with COCO visibility flags, rotated boxes as `bboxes (N, 5)`
normalised xywhr, instance masks at the prototypes' resolution, either one index mask per image (Ultralytics'
`overlap_mask=True`, its default) or one boolean mask per object (`overlap_mask=False`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from headguard.layouts import Geometry, detect_layout

__all__ = [
    "CONVEX_FAMILIES",
    "ComputeDtype",
    "DEGENERATE_FAMILIES",
    "HeadStrategies",
    "Initialisation",
    "Input",
    "MapRecipe",
    "ORDINARY_BOX_KINDS",
    "ORDINARY_POLYGON_KINDS",
    "SHIPPED",
    "TrainingBatch",
    "LAYOUTS",
    "PAIR_RELATIONS",
    "POLYGON_FAMILIES",
    "PolygonPair",
    "PolygonSample",
    "drawn",
    "drawn_feature_maps",
    "drawn_initialisations",
    "drawn_training_batches",
    "dtypes",
    "feature_maps",
    "format_polygon",
    "from_head",
    "image_sizes",
    "initialisations",
    "invalid_targets",
    "is_per_image",
    "magnitudes",
    "min_image_side",
    "ordinary_targets",
    "polygon_pairs",
    "polygon_samples",
    "polygons",
    "reorder_objects",
    "similarity",
    "targets",
    "task_targets",
    "typical_magnitudes",
]

LAYOUTS = ("contiguous", "channels_last", "non_contiguous")
FILLS = ("normal", "constant", "signs")
BOX_KINDS = ("normal", "tiny", "zero_width", "zero_height", "image_covering", "edge", "duplicate")
# Valid for detection losses but not drawn by default: a polygon inside such a box would leave the image.
EXTRA_BOX_KINDS = ("out_of_image",)
POLYGON_KINDS = ("convex", "all_equal", "collinear", "repeated_vertex", "padded")
# What real data holds: no zero-width or zero-height box, no all-equal or collinear polygon. A property that is not
# about degenerate objects draws these, so that a loss's NaN on a degenerate one (check_loss_finite_degenerate_targets'
# finding) is not reported again as its own.
ORDINARY_BOX_KINDS = ("normal", "tiny", "image_covering", "edge", "duplicate")
ORDINARY_POLYGON_KINDS = ("convex", "repeated_vertex", "padded")
# visible: every keypoint labelled and visible; mixed: each flag drawn; unlabelled: every flag 0 (coordinates 0, as
# COCO writes them); coincident: every keypoint visible at the box centre.
KEYPOINT_KINDS = ("visible", "mixed", "unlabelled", "coincident")
# COCO's flags, as Ultralytics' pose datasets carry them: 0 not labelled, 1 labelled but occluded, 2 visible.
VISIBILITY_FLAGS = (0.0, 1.0, 2.0)
# An object's mask: the ellipse inscribed in its box, the box itself, or no pixel at all (an object cropped away).
MASK_KINDS = ("ellipse", "box", "empty")
# The image the task shapes are measured at (the prototypes' resolution): the size the loss and training checks use.
TASK_IMAGE = (64, 64)
INVALID_KINDS = (
    "nan_box", "inf_box", "negative_size", "class_out_of_range", "batch_idx_out_of_range", "fractional_class"
)


# --------------------------------------------------------------------------------------------- argument validation
def _check_type(value, types, name: str, type_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise InvalidArgument(f"Expected {type_name} for {name}, got {name}={value!r} (type={type(value).__name__})")


def _check_int(value, name: str, *, min_value: int | None = None) -> None:
    _check_type(value, int, name, "int")
    if min_value is not None and value < min_value:
        raise InvalidArgument(f"Expected {name} >= {min_value}, got {name}={value!r}")


def _check_range(lo: int, hi: int, lo_name: str, hi_name: str) -> None:
    if lo > hi:
        raise InvalidArgument(f"Expected {lo_name} <= {hi_name}, got {lo_name}={lo!r} and {hi_name}={hi!r}")


def _check_levels(channels, strides) -> tuple[tuple[int, ...], tuple[float, ...]]:
    for name, seq in (("channels", channels), ("strides", strides)):
        if not isinstance(seq, Sequence) or isinstance(seq, str) or len(seq) == 0:
            raise InvalidArgument(
                f"Expected a non-empty sequence for {name}, got {name}={seq!r} (type={type(seq).__name__})"
            )
    for i, c in enumerate(channels):
        _check_int(c, f"channels[{i}]", min_value=1)
    for i, s in enumerate(strides):
        _check_type(s, (int, float), f"strides[{i}]", "a number")
        if not s > 0:
            raise InvalidArgument(f"Expected strides[{i}] > 0, got strides[{i}]={s!r}")
    if len(channels) != len(strides):
        raise InvalidArgument(
            f"Expected one stride per level, got {len(channels)} channels={tuple(channels)!r} and "
            f"{len(strides)} strides={tuple(strides)!r}"
        )
    return tuple(int(c) for c in channels), tuple(float(s) for s in strides)


def _check_strategy(value, name: str) -> None:
    if not isinstance(value, st.SearchStrategy):
        raise InvalidArgument(
            f"Expected a SearchStrategy for {name}, got {name}={value!r} (type={type(value).__name__})"
        )


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(
            f"Expected a floating torch.dtype for dtype, got dtype={dtype!r} (type={type(dtype).__name__})"
        )


# ----------------------------------------------------------------------------------------------------- feature maps
def magnitudes(*, max_value: float | None = 1e4, dtype: torch.dtype = torch.float32) -> st.SearchStrategy[float]:
    """Scales for feature maps: 0, 1e-30, ordinary values, 1e4, and (with max_value=None) near `dtype`'s maximum.

    The default stops at 1e4, where every head should stay finite; pass max_value=None for overflow hunting.
    """
    _check_dtype(dtype)
    top = torch.finfo(dtype).max / 4 if max_value is None else max_value
    _check_type(top, (int, float), "max_value", "a number or None")
    if not (math.isfinite(top) and top > 0):
        raise InvalidArgument(f"Expected a finite max_value > 0, got max_value={max_value!r}")
    ladder = [v for v in (0.0, 1e-30, 1e-6, 1e-2, 1.0, 1e2, 1e4) if v <= top]
    extremes = [top] if top not in ladder else []
    tiny = torch.finfo(dtype).tiny
    ladder = [v for v in ladder if v == 0.0 or v >= tiny] or [0.0]
    return st.sampled_from(ladder + extremes) | st.floats(min_value=0.0, max_value=min(top, 1e4))


def image_sizes(*, min_size: int = 33, max_size: int = 96) -> st.SearchStrategy[tuple[int, int]]:
    """(H, W) in pixels, odd and even, non-square; small by default so the anchor count A stays small."""
    _check_int(min_size, "min_size", min_value=1)
    _check_int(max_size, "max_size", min_value=1)
    _check_range(min_size, max_size, "min_size", "max_size")
    side = st.integers(min_value=min_size, max_value=max_size)
    return st.tuples(side, side)


# feature_maps' keyword arguments share these functions' names (Hypothesis style); it reaches them through aliases.
_default_image_sizes = image_sizes
_default_magnitudes = magnitudes


def feature_size(pixels: int, stride: float) -> int:
    """Feature-map side for an image side: a chain of padded stride-2 convs gives ceil(pixels / stride)."""
    return max(1, math.ceil(pixels / stride))


@dataclasses.dataclass(frozen=True)
class MapRecipe:
    """Everything that determines one list of feature maps; shrinks and prints readably in falsifying examples."""

    batch: int
    image_size: tuple[int, int]
    magnitude: float
    fill: str
    layout: str
    seed: int


def feature_maps(
    channels: Sequence[int],
    strides: Sequence[float],
    *,
    min_batch: int = 1,
    max_batch: int = 4,
    image_sizes: st.SearchStrategy[tuple[int, int]] | None = None,
    magnitudes: st.SearchStrategy[float] | None = None,
    dtype: torch.dtype = torch.float32,
    fills: Sequence[str] = FILLS,
    layouts: Sequence[str] = LAYOUTS,
) -> st.SearchStrategy[list[torch.Tensor]]:
    """Lists of feature maps (B, C_l, H_l, W_l), one per level, with one batch size and one image behind them.

    Values are `magnitude * base` where base is standard normal, a constant 1, or random signs; layouts are
    contiguous, channels-last, or non-contiguous (a transposed view), to catch `.view` on strided inputs.
    """
    channels, strides = _check_levels(channels, strides)
    _check_int(min_batch, "min_batch", min_value=1)
    _check_int(max_batch, "max_batch", min_value=1)
    _check_range(min_batch, max_batch, "min_batch", "max_batch")
    _check_dtype(dtype)
    sizes = image_sizes if image_sizes is not None else _default_image_sizes()
    scales = magnitudes if magnitudes is not None else _default_magnitudes(dtype=dtype)
    _check_strategy(sizes, "image_sizes")
    _check_strategy(scales, "magnitudes")
    _check_kinds(fills, FILLS, "fills")
    _check_kinds(layouts, LAYOUTS, "layouts")
    recipes = st.builds(
        MapRecipe,
        batch=st.integers(min_batch, max_batch),
        image_size=sizes,
        magnitude=scales,
        fill=st.sampled_from(tuple(fills)),
        layout=st.sampled_from(tuple(layouts)),
        seed=st.integers(0, 2**31 - 1),
    )
    return recipes.map(lambda r: make_feature_maps(channels, strides, r, dtype=dtype))


class FeatureMaps(list):
    """A list of feature maps that prints as the recipe that made it (falsifying examples stay readable)."""

    def __init__(self, maps, recipe: MapRecipe):
        super().__init__(maps)
        self.recipe = recipe

    def __repr__(self) -> str:
        shapes = [tuple(m.shape) for m in self]
        return f"FeatureMaps({self.recipe!r}, dtype={self[0].dtype}, shapes={shapes})"


class TargetBatch(dict):
    """A batch dict that prints its rows compactly."""

    def __repr__(self) -> str:
        rows = [
            f"(img={int(i)}, cls={int(c)}, {'xywhr' if len(b) == 5 else 'xywh'}={[round(float(v), 4) for v in b]})"
            for i, c, b in zip(self["batch_idx"], self["cls"][:, 0], self["bboxes"])
        ]
        extra = "".join(f", {k} {tuple(self[k].shape)}" for k in ("polygons", "keypoints", "masks") if k in self)
        return f"TargetBatch([{', '.join(rows)}]{extra})"


def make_feature_maps(channels, strides, recipe: MapRecipe, *, dtype=torch.float32) -> list[torch.Tensor]:
    """Build the feature maps a recipe describes (deterministic in recipe.seed)."""
    gen = torch.Generator().manual_seed(recipe.seed)
    h, w = recipe.image_size
    maps = []
    for c, s in zip(channels, strides):
        fh, fw = feature_size(h, s), feature_size(w, s)
        if recipe.fill == "constant":
            base = torch.ones(recipe.batch, c, fw, fh, dtype=torch.float64)
        elif recipe.fill == "signs":
            base = torch.randint(0, 2, (recipe.batch, c, fw, fh), generator=gen).double() * 2 - 1
        else:
            base = torch.randn(recipe.batch, c, fw, fh, generator=gen, dtype=torch.float64)
        # Built as (B, C, W, H) then transposed: the "non_contiguous" layout is that view itself.
        x = (base * recipe.magnitude).to(dtype).transpose(-1, -2)
        if recipe.layout == "contiguous":
            x = x.contiguous()
        elif recipe.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        maps.append(x)
    return FeatureMaps(maps, recipe)


# ---------------------------------------------------------------------------------------------------------- targets
def _box_from_kind(draw, kind: str, previous: list[tuple[float, float, float, float]]):
    """One normalised xywh box inside the unit image (edges may touch the border)."""
    if kind == "duplicate" and previous:
        return draw(st.sampled_from(previous))
    if kind == "image_covering":
        return (0.5, 0.5, 1.0, 1.0)
    if kind == "tiny":
        w = h = 1e-3
    elif kind in ("zero_width", "zero_height"):
        size = draw(st.floats(0.05, 0.5))
        w, h = (0.0, size) if kind == "zero_width" else (size, 0.0)
    else:
        w, h = draw(st.floats(0.05, 0.9)), draw(st.floats(0.05, 0.9))
    if kind == "out_of_image":  # centre outside the unit image, partly or wholly off it
        return (draw(st.sampled_from([-0.2, 1.1, 1.5])), draw(st.floats(0.0, 1.0)), w, h)
    if kind == "edge":  # touches the top-left corner exactly
        return (w / 2, h / 2, w, h)
    cx = draw(st.floats(w / 2, 1 - w / 2))
    cy = draw(st.floats(h / 2, 1 - h / 2))
    return (cx, cy, w, h)


def _polygon_in_box(draw, kind: str, box, num_vertices: int) -> tuple[list[list[float]], list[bool]]:
    """np vertices inside `box` (normalised xywh) of one family, cw or ccw, and the mask of real vertices."""
    cx, cy, w, h = box
    mask = [True] * num_vertices
    if kind == "all_equal":
        pts = [[cx, cy]] * num_vertices
    elif kind == "collinear":
        steps = [i / (num_vertices - 1) for i in range(num_vertices)]
        pts = [[cx - w / 2 + w * t, cy - h / 2 + h * t] for t in steps]
    else:
        real = num_vertices
        if kind == "padded":
            real = draw(st.integers(3, num_vertices))
        phase = draw(st.floats(0.0, 2 * math.pi))
        # A regular polygon inscribed in the box's ellipse: convex, with its bounding box inside `box`.
        angles = [phase + 2 * math.pi * i / real for i in range(real)]
        pts = [[cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)] for a in angles]
        if kind == "repeated_vertex":
            pts[1] = list(pts[0])
        if draw(st.booleans()):
            pts.reverse()  # clockwise instead of counter-clockwise
        pts = pts + [list(pts[-1])] * (num_vertices - real)
        mask = [True] * real + [False] * (num_vertices - real)
    return [[min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)] for x, y in pts], mask


def _keypoints_in(box, num_keypoints: int, kind: str, seed: int) -> torch.Tensor:
    """(nk, 3) keypoints of one family inside `box` (normalised xywh), with visibility flags; unlabelled keypoints
    sit at (0, 0), as in COCO."""
    gen = torch.Generator().manual_seed(seed)
    cx, cy, w, h = (float(v) for v in box[:4])
    where = torch.full((num_keypoints, 2), 0.5, dtype=torch.float64)
    if kind != "coincident":
        where = torch.rand(num_keypoints, 2, generator=gen, dtype=torch.float64)
    xy = torch.stack((cx - w / 2 + w * where[:, 0], cy - h / 2 + h * where[:, 1]), 1)
    flags = torch.full((num_keypoints,), 2.0, dtype=torch.float64)
    if kind == "mixed":
        drawn = torch.randint(0, len(VISIBILITY_FLAGS), (num_keypoints,), generator=gen)
        flags = torch.tensor(VISIBILITY_FLAGS, dtype=torch.float64)[drawn]
    elif kind == "unlabelled":
        flags = torch.zeros(num_keypoints, dtype=torch.float64)
    xy = xy * (flags != 0).unsqueeze(1)
    return torch.cat((xy.clamp(0.0, 1.0), flags.unsqueeze(1)), 1).float()


def _rotated_in(box, theta: float) -> tuple[float, float, float, float, float]:
    """xywhr of the rectangle of `box`'s aspect turned by `theta` and shrunk to fit inside `box`, in Ultralytics'
    canonical form (w the longer side, theta in [-pi/4, 3pi/4), as `ops.xyxyxyxy2xywhr` writes dataset labels). A box
    of zero width or height stays axis-aligned: no turned rectangle of it fits inside."""
    cx, cy, w, h = (float(v) for v in box[:4])
    if w <= 0 or h <= 0:
        theta = 0.0
    else:
        c, s = abs(math.cos(theta)), abs(math.sin(theta))
        fit = min(1.0, w / (w * c + h * s), h / (w * s + h * c))
        w, h = w * fit, h * fit
    if w < h:
        w, h, theta = h, w, theta + math.pi / 2
    theta = (theta + math.pi / 4) % math.pi - math.pi / 4
    return cx, cy, w, h, theta


def _object_mask(box, kind: str, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool mask of one object of `box` (normalised xywh), sampled at pixel centres."""
    height, width = size
    cx, cy, w, h = (float(v) for v in box[:4])
    y = ((torch.arange(height, dtype=torch.float64) + 0.5) / height).view(-1, 1)
    x = ((torch.arange(width, dtype=torch.float64) + 0.5) / width).view(1, -1)
    if kind == "empty" or w <= 0 or h <= 0:
        return torch.zeros(height, width, dtype=torch.bool)
    if kind == "box":
        return ((x - cx).abs() <= w / 2) & ((y - cy).abs() <= h / 2)
    return ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1


def _instance_masks(boxes, batch_idx, kinds, batch_size: int, size: tuple[int, int], overlap: bool) -> torch.Tensor:
    """Masks of the objects (rows grouped by image) as Ultralytics' collate delivers them.

    overlap=False: (N, H, W) bool, one per object. overlap=True: (B, H, W) integer index masks, pixel value k + 1 for
    the image's k-th object (its row order), 0 for background; larger objects are drawn first, so a smaller one
    covers them where they overlap (`data.utils.polygons2masks_overlap`)."""
    objects = [_object_mask(b, k, size) for b, k in zip(boxes, kinds)]
    if not overlap:
        return torch.stack(objects) if objects else torch.zeros(0, *size, dtype=torch.bool)
    per_image = [[r for r, i in enumerate(batch_idx) if int(i) == img] for img in range(batch_size)]
    dtype = torch.uint8 if max((len(rows) for rows in per_image), default=0) < 255 else torch.int32
    index = torch.zeros(batch_size, *size, dtype=dtype)
    for img, rows in enumerate(per_image):
        by_area = sorted(range(len(rows)), key=lambda k: -float(boxes[rows[k]][2] * boxes[rows[k]][3]))
        for k in by_area:
            index[img][objects[rows[k]]] = k + 1
    return index


def is_per_image(key: str, value: torch.Tensor) -> bool:
    """Whether a batch entry holds one item per image, not one per object: Ultralytics' overlapping index masks
    (a "masks" entry that is not boolean). Every other entry but batch_idx has one row per object."""
    return key == "masks" and value.dtype != torch.bool


def reorder_objects(batch, order) -> dict[str, torch.Tensor]:
    """`batch` with its objects in `order` (row indices that keep rows grouped by image, each image's own rows
    permuted): every per-object entry is indexed, per-image index masks are relabelled to the new order."""
    order = torch.as_tensor(order, dtype=torch.long)
    out = {k: v if is_per_image(k, v) else v[order] for k, v in batch.items()}
    if "masks" in batch and is_per_image("masks", batch["masks"]):
        idx = batch["batch_idx"].long()
        within = _within_image_index(idx)
        relabel = torch.zeros(batch["masks"].shape[0], len(idx) + 1, dtype=torch.long)
        relabel[idx[order], within[order] + 1] = _within_image_index(idx[order]) + 1
        masks = batch["masks"].long()
        out["masks"] = relabel.gather(1, masks.flatten(1)).view_as(masks).to(batch["masks"].dtype)
    return type(batch)(out) if isinstance(batch, TargetBatch) else out


def _within_image_index(batch_idx: torch.Tensor) -> torch.Tensor:
    """Each row's index among the rows of its own image, in row order."""
    return torch.tensor([int((batch_idx[:r] == i).sum()) for r, i in enumerate(batch_idx.tolist())], dtype=torch.long)


def task_targets(
    batch,
    *,
    batch_size: int,
    keypoint_shape: tuple[int, int] | None = None,
    rotated: bool = False,
    mask_size: tuple[int, int] | None = None,
    mask_overlap: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`batch` (batch_idx, cls, bboxes xywh; rows grouped by image) with ordinary task targets for its boxes,
    deterministic in `seed`: visible keypoints inside each box, each box turned by a random angle (bboxes become
    xywhr), the ellipse inscribed in each box as its mask. For checks that choose their boxes by hand."""
    _check_task_args(keypoint_shape, mask_size, batch_size)
    gen = torch.Generator().manual_seed(seed)
    out = dict(batch)
    boxes = batch["bboxes"]
    n = boxes.shape[0]
    if keypoint_shape is not None:
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
        kpts = [_keypoints_in(b, keypoint_shape[0], "visible", s) for b, s in zip(boxes.tolist(), seeds)]
        out["keypoints"] = torch.stack(kpts) if kpts else torch.zeros(0, keypoint_shape[0], 3)
    if mask_size is not None:
        out["masks"] = _instance_masks(boxes.tolist(), batch["batch_idx"].tolist(), ["ellipse"] * n, batch_size,
                                       mask_size, mask_overlap)
    if rotated and boxes.shape[-1] == 4:
        thetas = (torch.rand(n, generator=gen, dtype=torch.float64) * math.pi - math.pi / 4).tolist()
        out["bboxes"] = torch.tensor([_rotated_in(b, t) for b, t in zip(boxes.tolist(), thetas)],
                                     dtype=boxes.dtype).reshape(n, 5)
    return type(batch)(out) if isinstance(batch, TargetBatch) else out


def _check_task_args(keypoint_shape, mask_size, batch_size) -> None:
    _check_int(batch_size, "batch_size", min_value=1)
    for name, value, lows in (("keypoint_shape", keypoint_shape, (1, 2)), ("mask_size", mask_size, (1, 1))):
        if value is None:
            continue
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise InvalidArgument(f"Expected None or a pair of ints for {name}, got {name}={value!r}")
        if value[0] < lows[0] or value[1] < lows[1] or (name == "keypoint_shape" and value[1] > 3):
            also = " with ndim 2 or 3" if name == "keypoint_shape" else ""
            raise InvalidArgument(f"Expected {name} of at least {lows}{also}, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class _TaskRequest:
    """What `targets` draws beside the boxes: keypoints, rotation, masks (None/False: not drawn)."""

    keypoint_shape: tuple[int, int] | None
    keypoint_kinds: tuple[str, ...]
    rotated: bool
    mask_size: tuple[int, int] | None
    mask_overlap: bool
    mask_kinds: tuple[str, ...]


@st.composite
def _target_batches(draw, nc, batch_size, num_vertices, min_objects, max_objects, box_kinds, polygon_kinds,
                    task: _TaskRequest):
    n = draw(st.integers(min_objects, max_objects))
    boxes, idx, cls, polys, masks, extras = [], [], [], [], [], []
    for _ in range(n):
        kind = draw(st.sampled_from(box_kinds))
        box = _box_from_kind(draw, kind, boxes)
        boxes.append(box)
        idx.append(draw(st.integers(0, batch_size - 1)))
        cls.append(draw(st.integers(0, nc - 1)))
        if num_vertices:
            pts, mask = _polygon_in_box(draw, draw(st.sampled_from(polygon_kinds)), box, num_vertices)
            polys.append(pts)
            masks.append(mask)
        extras.append(_draw_task_extras(draw, box, task))
    # Rows grouped by image in ascending order, as Ultralytics' collate makes them: its losses (and forks') index
    # per-image slots by running counts and need it. Our own loss accepts any order (tests/property).
    order = sorted(range(n), key=idx.__getitem__)
    boxes, idx, cls = [boxes[i] for i in order], [idx[i] for i in order], [cls[i] for i in order]
    polys, masks = [polys[i] for i in order] if polys else polys, [masks[i] for i in order] if masks else masks
    extras = [extras[i] for i in order]
    batch = TargetBatch({
        "batch_idx": torch.tensor(idx, dtype=torch.float32),
        "cls": torch.tensor(cls, dtype=torch.float32).reshape(n, 1),
        "bboxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
    })
    if num_vertices:
        batch["polygons"] = torch.tensor(polys, dtype=torch.float32).reshape(n, num_vertices, 2)
        batch["polygon_mask"] = torch.tensor(masks, dtype=torch.bool).reshape(n, num_vertices)
    if task.keypoint_shape is not None:
        kpts = [_keypoints_in(b, task.keypoint_shape[0], e["keypoints"], e["seed"]) for b, e in zip(boxes, extras)]
        batch["keypoints"] = torch.stack(kpts) if kpts else torch.zeros(0, task.keypoint_shape[0], 3)
    if task.mask_size is not None:
        batch["masks"] = _instance_masks(boxes, idx, [e["mask"] for e in extras], batch_size, task.mask_size,
                                         task.mask_overlap)
    if task.rotated:
        batch["bboxes"] = torch.tensor([_rotated_in(b, e["theta"]) for b, e in zip(boxes, extras)],
                                       dtype=torch.float32).reshape(n, 5)
    return batch


def _draw_task_extras(draw, box, task: _TaskRequest) -> dict:
    """One object's drawn keypoint family (and the seed of its positions), rotation and mask family."""
    extras = {}
    if task.keypoint_shape is not None:
        extras["keypoints"] = draw(st.sampled_from(task.keypoint_kinds))
        extras["seed"] = draw(st.integers(0, 2**31 - 1))
    if task.rotated:
        extras["theta"] = draw(st.floats(-math.pi / 4, 3 * math.pi / 4, exclude_max=True))
    if task.mask_size is not None:
        extras["mask"] = draw(st.sampled_from(task.mask_kinds))
    return extras


def _check_target_args(nc, batch_size, num_vertices, min_objects, max_objects) -> None:
    _check_int(nc, "nc", min_value=1)
    _check_int(batch_size, "batch_size", min_value=1)
    _check_int(num_vertices, "num_vertices", min_value=0)
    if 0 < num_vertices < 3:
        raise InvalidArgument(f"Expected num_vertices == 0 (no polygons) or >= 3, got num_vertices={num_vertices!r}")
    _check_int(min_objects, "min_objects", min_value=0)
    _check_int(max_objects, "max_objects", min_value=0)
    _check_range(min_objects, max_objects, "min_objects", "max_objects")


def _check_kinds(chosen, known, name):
    bad = [k for k in chosen if k not in known]
    if not chosen or bad:
        raise InvalidArgument(f"Expected a non-empty subset of {known} for {name}, got {name}={tuple(chosen)!r}")


def targets(
    nc: int,
    *,
    batch_size: int = 1,
    num_vertices: int = 0,
    min_objects: int = 0,
    max_objects: int = 6,
    box_kinds: Sequence[str] = BOX_KINDS,
    polygon_kinds: Sequence[str] = POLYGON_KINDS,
    keypoint_shape: tuple[int, int] | None = None,
    keypoint_kinds: Sequence[str] = KEYPOINT_KINDS,
    rotated: bool = False,
    mask_size: tuple[int, int] | None = None,
    mask_overlap: bool = True,
    mask_kinds: Sequence[str] = MASK_KINDS,
) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """VALID batch dicts for `batch_size` images: `batch_idx (N,)`, `cls (N, 1)`, `bboxes (N, 4)` normalised xywh,
    plus `polygons (N, np, 2)` and `polygon_mask (N, np)` when num_vertices > 0. Rows are sorted by image, as
    Ultralytics' collate delivers them. For the other tasks (see the module docstring):

    - keypoint_shape=(nk, ndim): `keypoints (N, nk, 3)` normalised xy inside the box and a visibility flag in
      VISIBILITY_FLAGS (always 3 columns: Ultralytics' pose loss reads the flag whatever ndim the head predicts);
      families `keypoint_kinds` (see KEYPOINT_KINDS);
    - rotated=True: `bboxes (N, 5)` normalised xywhr, the drawn box's rectangle turned and shrunk to fit inside it,
      canonical (w >= h, theta in [-pi/4, 3pi/4));
    - mask_size=(H, W): `masks`, per image `(B, H, W)` integer index masks when mask_overlap (Ultralytics'
      default) else per object `(N, H, W)` bool; families `mask_kinds` (see MASK_KINDS).

    Empty batches, one object and many; zero-width/height, tiny, image-covering, edge-touching and duplicate boxes;
    polygons convex, all-equal, collinear, with a repeated vertex, or padded (masked), in either orientation. Every
    box and vertex lies inside the image [0, 1]; each polygon lies inside its box. Restrict `box_kinds` /
    `polygon_kinds` to exclude degenerate families when a property needs ordinary objects.
    """
    _check_target_args(nc, batch_size, num_vertices, min_objects, max_objects)
    _check_kinds(box_kinds, BOX_KINDS + EXTRA_BOX_KINDS, "box_kinds")
    _check_kinds(polygon_kinds, POLYGON_KINDS, "polygon_kinds")
    _check_task_args(keypoint_shape, mask_size, batch_size)
    _check_kinds(keypoint_kinds, KEYPOINT_KINDS, "keypoint_kinds")
    _check_kinds(mask_kinds, MASK_KINDS, "mask_kinds")
    for name, value in (("rotated", rotated), ("mask_overlap", mask_overlap)):
        if not isinstance(value, bool):
            raise InvalidArgument(f"Expected bool for {name}, got {name}={value!r} (type={type(value).__name__})")
    task = _TaskRequest(keypoint_shape, tuple(keypoint_kinds), rotated, mask_size, mask_overlap, tuple(mask_kinds))
    return _target_batches(
        nc, batch_size, num_vertices, min_objects, max_objects, tuple(box_kinds), tuple(polygon_kinds), task
    )


@st.composite
def _invalid_batches(draw, nc, batch_size, num_vertices, kinds):
    batch = draw(targets(nc, batch_size=batch_size, num_vertices=num_vertices, min_objects=1, max_objects=3,
                         box_kinds=("normal",), polygon_kinds=("convex",)))
    kind = draw(st.sampled_from(kinds))
    row = draw(st.integers(0, batch["cls"].shape[0] - 1))
    if kind == "nan_box":
        batch["bboxes"][row, draw(st.integers(0, 3))] = math.nan
    elif kind == "inf_box":
        batch["bboxes"][row, draw(st.integers(0, 3))] = math.inf
    elif kind == "negative_size":
        batch["bboxes"][row, draw(st.integers(2, 3))] = -0.1
    elif kind == "class_out_of_range":
        batch["cls"][row, 0] = float(draw(st.sampled_from([nc, nc + 3, -1])))
    elif kind == "batch_idx_out_of_range":
        batch["batch_idx"][row] = float(draw(st.sampled_from([batch_size, -1])))
    elif kind == "fractional_class":
        batch["cls"][row, 0] = 0.5
    return kind, batch


def invalid_targets(
    nc: int, *, batch_size: int = 1, num_vertices: int = 0, kinds: Sequence[str] = INVALID_KINDS
) -> st.SearchStrategy[tuple[str, dict[str, torch.Tensor]]]:
    """(kind, batch) pairs a loss must reject with a clear error: non-finite or negative-size boxes, classes or
    image indices out of range or fractional. Never mix these into `targets`.

    Boxes reaching outside the image are NOT here: the reference losses accept them (the assigner simply finds no
    anchors outside), so they are valid input; `targets(box_kinds=(..., "out_of_image"))` produces them."""
    _check_target_args(nc, batch_size, num_vertices, 1, 3)
    _check_kinds(kinds, INVALID_KINDS, "kinds")
    return _invalid_batches(nc, batch_size, num_vertices, tuple(kinds))


# --------------------------------------------------------------------------------------------------------- polygons
POLYGON_FAMILIES = ("convex", "repeated_vertex", "collinear", "segment", "point", "zero_area", "huge", "tiny")
# The families whose vertices are in strictly convex position (no repeats, no three on a line): `convex=True`.
CONVEX_FAMILIES = ("convex", "huge", "tiny")
DEGENERATE_FAMILIES = tuple(f for f in POLYGON_FAMILIES if f != "convex")
PAIR_RELATIONS = ("independent", "near")
_ORDINARY_CENTRE = 5.0  # centres in [-5, 5]^2 and semi-axes in [0.5, 3]: independent pairs overlap, touch or not


def _ellipse_polygon(gaps, start: float, a: float, b: float, angle: float, centre) -> torch.Tensor:
    """Vertices (len(gaps), 2) float64 on an ellipse (semi-axes a, b, turned by `angle`), counter-clockwise, the
    angular gap before each vertex proportional to `gaps`: strictly convex for positive gaps."""
    phi = start + 2 * math.pi * torch.cumsum(torch.tensor(gaps, dtype=torch.float64), 0) / float(sum(gaps))
    local = torch.stack((a * phi.cos(), b * phi.sin()), dim=1)
    return similarity(local, 1.0, angle, centre)


def similarity(points: torch.Tensor, scale: float, angle: float, shift) -> torch.Tensor:
    """`points` (..., 2) scaled about the origin, turned by `angle` (radians, counter-clockwise), then shifted."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=points.dtype)
    return scale * points @ rot.T + torch.as_tensor(shift, dtype=points.dtype)


def _extent(points: torch.Tensor) -> float:
    """The longer side of the bounding box of `points` (V, 2)."""
    return float((points.amax(dim=0) - points.amin(dim=0)).max()) if len(points) else 0.0


@st.composite
def _convex(draw, n: int) -> torch.Tensor:
    gaps = draw(st.lists(st.floats(0.3, 1.0), min_size=n, max_size=n))
    start, angle = draw(st.floats(0, 2 * math.pi)), draw(st.floats(0, 2 * math.pi))
    a, b = draw(st.floats(0.5, 3.0)), draw(st.floats(0.5, 3.0))
    centre = draw(st.tuples(*[st.floats(-_ORDINARY_CENTRE, _ORDINARY_CENTRE)] * 2))
    polygon = _ellipse_polygon(gaps, start, a, b, angle, centre)
    return polygon.flip(0) if draw(st.booleans()) else polygon  # either orientation


def _on_a_line(draw, positions: list[float]) -> torch.Tensor:
    """Points at `positions` (in units of a drawn half-length) along a drawn line through a drawn centre."""
    half, angle = draw(st.floats(0.5, 3.0)), draw(st.floats(0, math.pi))
    centre = draw(st.tuples(*[st.floats(-_ORDINARY_CENTRE, _ORDINARY_CENTRE)] * 2))
    local = torch.tensor([[half * p, 0.0] for p in positions], dtype=torch.float64)
    return similarity(local, 1.0, angle, centre)


def _repeated(draw, n: int) -> torch.Tensor:
    """k < n distinct vertices of a convex polygon, some repeated in place (consecutive copies) to make n."""
    k = draw(st.integers(min(3, n - 1), n - 1))
    base = draw(_convex(k))
    copies = draw(st.lists(st.integers(0, k - 1), min_size=n - k, max_size=n - k))
    order = [i for i in range(k) for _ in range(1 + copies.count(i))]
    return base[order]


def _there_and_back(draw, n: int) -> torch.Tensor:
    """A convex arc traversed there and back: signed area 0, though (for n >= 4) its vertices span a 2-D hull. For
    odd n the last vertex is the midpoint of the arc's first segment, so the return still retraces the arc."""
    m = n // 2
    arc = draw(_convex(m + 1))
    back = arc[1:m].flip(0)
    tail = [(arc[:1] + arc[1:2]) / 2] if n % 2 else []
    return torch.cat([arc, back, *tail])


def _scaled_to(polygon: torch.Tensor, magnitude: float) -> torch.Tensor:
    """`polygon` scaled about the origin so that its largest absolute coordinate is `magnitude`."""
    return polygon * (magnitude / float(polygon.abs().max()))


@st.composite
def _polygon(draw, n: int, families: tuple[str, ...], magnitudes: tuple[float, float]) -> torch.Tensor:
    """One float64 polygon (n, 2) of a drawn family."""
    family = draw(st.sampled_from(families))
    if family == "point":
        return torch.tensor([draw(st.tuples(*[st.floats(-_ORDINARY_CENTRE, _ORDINARY_CENTRE)] * 2))] * n,
                            dtype=torch.float64)
    if family == "segment":  # two distinct end points, each repeated
        ends = _on_a_line(draw, [-1.0, 1.0])
        return ends[[0] * ((n + 1) // 2) + [1] * (n // 2)]
    if family == "collinear":  # n distinct points along one line, in order
        gaps = draw(st.lists(st.floats(0.1, 1.0), min_size=n - 1, max_size=n - 1))
        steps = torch.cumsum(torch.tensor([0.0, *gaps], dtype=torch.float64), 0)
        return _on_a_line(draw, (2 * steps / steps[-1] - 1).tolist())
    if family == "repeated_vertex":
        return _repeated(draw, n)
    if family == "zero_area":
        return _there_and_back(draw, n)
    polygon = draw(_convex(n))
    if family == "huge":
        return _scaled_to(polygon, magnitudes[1])
    if family == "tiny":
        return _scaled_to(polygon, magnitudes[0])
    return polygon


def _inner_radius(polygon: torch.Tensor) -> float:
    """The distance from the vertex mean to the nearest line through an edge (0 for points and segments): a disc
    of that radius about the mean lies inside a convex polygon."""
    edges = polygon.roll(-1, 0) - polygon
    length = edges.norm(dim=1)
    offset = polygon.mean(dim=0) - polygon
    distance = (edges[:, 0] * offset[:, 1] - edges[:, 1] * offset[:, 0]).abs() / length.clamp(min=1e-300)
    real = length > 1e-12 * max(_extent(polygon), 1e-300)
    return float(distance[real].min()) if bool(real.any()) else 0.0


def _moved(target: torch.Tensor, scale: float, angle: float, offset) -> torch.Tensor:
    """`target` scaled by `scale` and turned by `angle` about its vertex mean, then moved by `offset` (2,)."""
    centre = target.mean(dim=0)
    return similarity(target - centre, scale, angle, centre + torch.as_tensor(offset, dtype=torch.float64))


@st.composite
def _near(draw, target: torch.Tensor) -> torch.Tensor:
    """`target` scaled by 0.5-1.5, turned by up to 0.6 rad, its mean moved by less than its inner radius: a convex
    target and its moved copy share that point, so they overlap."""
    scale, angle = draw(st.floats(0.5, 1.5)), draw(st.floats(-0.6, 0.6))
    shift = torch.tensor(draw(st.tuples(*[st.floats(-0.5, 0.5)] * 2)), dtype=torch.float64)
    return _moved(target, scale, angle, shift * _inner_radius(target))


class PolygonPair(NamedTuple):
    """A (pred, target) pair of polygons (V, 2) with the same vertex count; prints its vertices (6 digits)."""

    pred: torch.Tensor
    target: torch.Tensor

    def __repr__(self) -> str:
        return f"PolygonPair(pred={format_polygon(self.pred)}, target={format_polygon(self.target)})"


def format_polygon(polygon: torch.Tensor) -> str:
    """`[[x, y], ...]` with 6 significant digits (and the dtype unless float64), for messages and examples."""
    points = ", ".join(f"[{float(x):.6g}, {float(y):.6g}]" for x, y in polygon.detach().double().tolist())
    dtype = "" if polygon.dtype == torch.float64 else f" ({str(polygon.dtype).removeprefix('torch.')})"
    return f"[{points}]{dtype}"


def _polygon_magnitudes(dtype: torch.dtype, min_magnitude, max_magnitude) -> tuple[float, float]:
    """(tiny, huge) largest coordinates. Derived: huge 1e8, or a quarter of `dtype`'s maximum when that is less
    (near pairs stay representable); tiny 1e-6, or 64 times `dtype`'s smallest normal when that is more."""
    info = torch.finfo(dtype)
    low = max(1e-6, info.tiny * 64) if min_magnitude is None else min_magnitude
    high = min(1e8, info.max / 4) if max_magnitude is None else max_magnitude
    for name, value in (("min_magnitude", low), ("max_magnitude", high)):
        _check_type(value, (int, float), name, "a number or None")
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"Expected a finite {name} > 0, got {name}={value!r}")
    if low > high:
        raise InvalidArgument(f"Expected min_magnitude <= max_magnitude, got min_magnitude={low!r} and "
                              f"max_magnitude={high!r}")
    return float(low), float(high)


def _polygon_args(min_vertices, max_vertices, families, convex, dtype, min_magnitude, max_magnitude):
    _check_int(min_vertices, "min_vertices", min_value=3)
    _check_int(max_vertices, "max_vertices", min_value=3)
    _check_range(min_vertices, max_vertices, "min_vertices", "max_vertices")
    _check_kinds(families, POLYGON_FAMILIES, "families")
    if not isinstance(convex, bool):
        raise InvalidArgument(f"Expected bool for convex, got convex={convex!r} (type={type(convex).__name__})")
    _check_dtype(dtype)
    chosen = tuple(f for f in families if f in CONVEX_FAMILIES) if convex else tuple(families)
    if not chosen:
        raise InvalidArgument(f"Expected families to include one of {CONVEX_FAMILIES} with convex=True, got "
                              f"families={tuple(families)!r}")
    return chosen, _polygon_magnitudes(dtype, min_magnitude, max_magnitude)


def polygons(
    *,
    min_vertices: int = 3,
    max_vertices: int = 8,
    families: Sequence[str] = POLYGON_FAMILIES,
    convex: bool = False,
    dtype: torch.dtype = torch.float64,
    min_magnitude: float | None = None,
    max_magnitude: float | None = None,
) -> st.SearchStrategy[torch.Tensor]:
    """Polygons (V, 2) in `dtype`, vertices in order, either orientation, of these families:

    - convex: strictly convex, on a rotated ellipse (semi-axes 0.5-3, centre within 5 of the origin);
    - repeated_vertex: a convex polygon with some vertices repeated in place;
    - collinear: V distinct points in order along one line; segment: two distinct points, each repeated;
    - point: every vertex equal; zero_area: a convex arc there and back (signed area 0, 2-D hull);
    - huge / tiny: a convex polygon whose largest coordinate is `max_magnitude` / `min_magnitude` (None: derived
      from `dtype`, 1e8 and 1e-6 where representable).

    `convex=True` keeps only the strictly convex families (convex, huge, tiny) of `families`.
    """
    chosen, magnitudes = _polygon_args(min_vertices, max_vertices, families, convex, dtype, min_magnitude,
                                       max_magnitude)
    return st.integers(min_vertices, max_vertices).flatmap(
        lambda n: _polygon(n, chosen, magnitudes).map(lambda p: p.to(dtype)))


@st.composite
def _pairs(draw, vertices, families, relations, magnitudes, dtype) -> PolygonPair:
    n = draw(st.integers(*vertices))
    target = draw(_polygon(n, families, magnitudes))
    relation = draw(st.sampled_from(relations))
    pred = draw(_polygon(n, families, magnitudes)) if relation == "independent" else draw(_near(target))
    return PolygonPair(pred.to(dtype), target.to(dtype))


def polygon_pairs(
    *,
    min_vertices: int = 3,
    max_vertices: int = 8,
    families: Sequence[str] = POLYGON_FAMILIES,
    convex: bool = False,
    relations: Sequence[str] = PAIR_RELATIONS,
    dtype: torch.dtype = torch.float64,
    min_magnitude: float | None = None,
    max_magnitude: float | None = None,
) -> st.SearchStrategy[PolygonPair]:
    """(pred, target) `PolygonPair`s with one vertex count V, each polygon as `polygons` draws it.

    relations: "independent" draws pred like the target (its own family: from far apart to overlapping, a point
    inside a polygon, ...); "near" moves the target a little (scaled by 0.5-1.5 and turned by up to 0.6 rad about
    its vertex mean, which moves by less than the target's inner radius), so a convex target's pair overlaps.
    """
    chosen, magnitudes = _polygon_args(min_vertices, max_vertices, families, convex, dtype, min_magnitude,
                                       max_magnitude)
    _check_kinds(relations, PAIR_RELATIONS, "relations")
    return _pairs((min_vertices, max_vertices), chosen, tuple(relations), magnitudes, dtype)


@dataclasses.dataclass(frozen=True)
class PolygonSample:
    """A seeded random sample of `size` convex pairs, half independent, half near, each pair with its own vertex
    count in [min_vertices, max_vertices] (pred and target alike).

    For properties of a population (a rank correlation) that no single example shows: a batch Hypothesis chose pair
    by pair would start from its simplest case (every pair alike). `pairs()` rebuilds the same pairs from the seed."""

    seed: int
    size: int
    min_vertices: int = 3
    max_vertices: int = 8

    def pairs(self) -> list[PolygonPair]:
        """The `size` pairs, float64."""
        gen = torch.Generator().manual_seed(self.seed)
        counts = torch.randint(self.min_vertices, self.max_vertices + 1, (self.size,), generator=gen).tolist()
        return [_random_pair(gen, n, near=i % 2 == 0) for i, n in enumerate(counts)]


def _random_pair(gen: torch.Generator, n: int, *, near: bool) -> PolygonPair:
    """(pred, target) from `gen`, in the ranges of `_convex` and `_near` but for the shift; centres within 2 of the
    origin, so most independent pairs overlap, as a ranking by IoU needs."""

    def uniform(low: float, high: float, size: int = 1) -> list[float]:
        return (low + (high - low) * torch.rand(size, generator=gen, dtype=torch.float64)).tolist()

    def convex() -> torch.Tensor:
        (start, angle), (a, b) = uniform(0, 2 * math.pi, 2), uniform(0.5, 3.0, 2)
        return _ellipse_polygon(uniform(0.3, 1.0, n), start, a, b, angle, uniform(-2.0, 2.0, 2))

    target = convex()
    if not near:
        return PolygonPair(convex(), target)
    # Moved by up to half its extent (not its inner radius): near pairs from nested to barely overlapping.
    offset = torch.tensor(uniform(-0.5, 0.5, 2), dtype=torch.float64) * _extent(target)
    return PolygonPair(_moved(target, uniform(0.5, 1.5)[0], uniform(-0.6, 0.6)[0], offset), target)


def polygon_samples(
    *, size: int = 300, min_vertices: int = 3, max_vertices: int = 8, seeds: st.SearchStrategy[int] | None = None
) -> st.SearchStrategy[PolygonSample]:
    """`PolygonSample`s of `size` pairs: Hypothesis draws (and shrinks) only the seed, from `seeds` (None: any
    integer in [0, 2**31)), never the pairs."""
    _check_int(size, "size", min_value=2)
    _check_int(min_vertices, "min_vertices", min_value=3)
    _check_int(max_vertices, "max_vertices", min_value=3)
    _check_range(min_vertices, max_vertices, "min_vertices", "max_vertices")
    seeds = st.integers(0, 2**31 - 1) if seeds is None else seeds
    _check_strategy(seeds, "seeds")
    return st.builds(PolygonSample, seed=seeds, size=st.just(size), min_vertices=st.just(min_vertices),
                     max_vertices=st.just(max_vertices))


# ------------------------------------------------------------------------------------------ initialisations, dtypes
@dataclasses.dataclass(frozen=True)
class Initialisation:
    """Applies one initialisation to a head in place: as shipped (scale 1, no noise), or every trainable conv weight
    scaled by `scale` and then perturbed by Gaussian noise of `noise` times that weight's own standard deviation
    (seeded; the biases, where bias_init puts the priors, are left as shipped)."""

    scale: float = 1.0
    noise: float = 0.0
    seed: int = 0

    def __call__(self, head: nn.Module) -> nn.Module:
        if self.scale == 1.0 and self.noise == 0.0:
            return head
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for m in head.modules():
                if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                    spread = float(m.weight.detach().double().std()) if m.weight.numel() > 1 else 0.0
                    m.weight.mul_(self.scale)
                    if self.noise:
                        jitter = torch.randn(m.weight.shape, generator=gen, dtype=torch.float64)
                        m.weight.add_((jitter * self.noise * spread).to(m.weight.dtype))
        return head

    def __repr__(self) -> str:
        if self.scale == 1.0 and self.noise == 0.0:
            return "Initialisation(as shipped)"
        parts = ([f"weights x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"+ {self.noise:g} sd noise (seed {self.seed})"] if self.noise else [])
        return f"Initialisation({' '.join(parts)})"


SHIPPED = Initialisation()


def initialisations(*, scales: Sequence[float] = (1e-3, 1e-1, 10.0, 1e2),
                    noises: Sequence[float] = (0.0, 0.1, 1.0)) -> st.SearchStrategy[Initialisation]:
    """The shipped init, and trainable conv weights scaled by small and large factors and perturbed by noise of a
    fraction of each weight's spread. The shipped init comes first, so it is what a failure shrinks towards."""
    for i, s in enumerate(scales):
        _check_type(s, (int, float), f"scales[{i}]", "a number")
        if not (math.isfinite(s) and s > 0):
            raise InvalidArgument(f"Expected finite scales > 0, got scales[{i}]={s!r}")
    for i, n in enumerate(noises):
        _check_type(n, (int, float), f"noises[{i}]", "a number")
        if not (math.isfinite(n) and n >= 0):
            raise InvalidArgument(f"Expected finite noises >= 0, got noises[{i}]={n!r}")
    changed = st.builds(Initialisation, scale=st.sampled_from((1.0, *map(float, scales))),
                        noise=st.sampled_from(tuple(map(float, noises))), seed=st.integers(0, 2**16))
    return st.just(SHIPPED) | changed


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
    """Where and in what precision to run: fp32, bf16 autocast on CPU, fp16 autocast (with a GradScaler) on CUDA."""

    name: str
    device: str
    autocast_dtype: torch.dtype | None

    def autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)

    def __repr__(self) -> str:
        return f"ComputeDtype({self.name})"


FP32 = ComputeDtype("float32", "cpu", None)
BF16_CPU = ComputeDtype("bfloat16-autocast-cpu", "cpu", torch.bfloat16)
FP16_CUDA = ComputeDtype("float16-autocast-cuda", "cuda", torch.float16)


def dtypes(*, cuda: bool | None = None) -> st.SearchStrategy[ComputeDtype]:
    """fp32 and bf16 autocast on CPU; fp16 autocast on CUDA only (cuda=None: when a CUDA device is available)."""
    if cuda is not None and not isinstance(cuda, bool):
        raise InvalidArgument(f"Expected bool or None for cuda, got cuda={cuda!r} (type={type(cuda).__name__})")
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    return st.sampled_from((FP32, BF16_CPU) + ((FP16_CUDA,) if use_cuda else ()))


# ------------------------------------------------------------------------------------------------------ from_head
@dataclasses.dataclass(frozen=True)
class HeadStrategies:
    """All strategies bound to one head's channels, strides, nc and vertex count."""

    channels: tuple[int, ...]
    strides: tuple[float, ...]
    nc: int
    num_vertices: int = 0
    keypoint_shape: tuple[int, int] | None = None
    rotated: bool = False
    mask_size: tuple[int, int] | None = None
    mask_overlap: bool = True

    def feature_maps(self, **kwargs) -> st.SearchStrategy[list[torch.Tensor]]:
        return feature_maps(self.channels, self.strides, **kwargs)

    def targets(self, **kwargs) -> st.SearchStrategy[dict[str, torch.Tensor]]:
        return targets(self.nc, num_vertices=self.num_vertices, **self._task(), **kwargs)

    def task_targets(self, batch, *, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """`task_targets` for this head's tasks: `batch` with its keypoints, angles and masks added."""
        return task_targets(batch, batch_size=batch_size, seed=seed, **self._task())

    def _task(self) -> dict:
        return {"keypoint_shape": self.keypoint_shape, "rotated": self.rotated, "mask_size": self.mask_size,
                "mask_overlap": self.mask_overlap}

    def invalid_targets(self, **kwargs):
        return invalid_targets(self.nc, num_vertices=self.num_vertices, **kwargs)

    def inputs(self, *, targets_kwargs: dict | None = None, **map_kwargs) -> st.SearchStrategy[TrainingBatch]:
        """TrainingBatch (feature maps, batch dict) pairs with matching batch sizes."""
        return _training_batches(self, dict(map_kwargs), dict(targets_kwargs or {}))

    @staticmethod
    def initialisations(**kwargs) -> st.SearchStrategy[Initialisation]:
        return initialisations(**kwargs)

    @staticmethod
    def dtypes(**kwargs) -> st.SearchStrategy[ComputeDtype]:
        return dtypes(**kwargs)


class TrainingBatch(NamedTuple):
    """One training step's inputs: feature maps and the target batch of the same images (unpacks as a pair; prints
    as the recipe of the maps and the rows of the batch)."""

    feats: FeatureMaps
    batch: TargetBatch


@st.composite
def _training_batches(draw, bound: HeadStrategies, map_kwargs: dict, targets_kwargs: dict) -> TrainingBatch:
    maps = draw(bound.feature_maps(**map_kwargs), label="feats")
    batch = draw(bound.targets(batch_size=maps[0].shape[0], **targets_kwargs), label="batch")
    return TrainingBatch(maps, batch)


def from_head(head_or_subject) -> HeadStrategies:
    """Bind the strategies to a subject (`headguard.subject.Subject`) or an initialised head module.

    For a bare module: strides come from `head.stride`, `nc` and `np` from its attributes, and each level's input
    channels from the first Conv2d of each item of its first per-level ModuleList.
    """
    if hasattr(head_or_subject, "prototype") and hasattr(head_or_subject, "channels"):
        s = head_or_subject
        task = _subject_task(s) if s.capabilities & {"keypoints", "angles", "masks"} else {}
        return HeadStrategies(tuple(s.channels), tuple(float(x) for x in s.strides), int(s.nc), int(s.num_vertices),
                              **task)
    if not isinstance(head_or_subject, nn.Module):
        raise InvalidArgument(
            f"Expected an nn.Module or a Subject for head_or_subject, got head_or_subject={head_or_subject!r} "
            f"(type={type(head_or_subject).__name__})"
        )
    head = head_or_subject
    stride = getattr(head, "stride", None)
    if stride is None or not bool((torch.as_tensor(stride) > 0).all()):
        raise InvalidArgument(f"from_head needs head.stride set to positive values, got head.stride={stride!r}")
    strides = tuple(float(x) for x in torch.as_tensor(stride).flatten())
    channels = _input_channels(head, len(strides))
    nc = getattr(head, "nc", None)
    _check_int(nc, "head.nc", min_value=1)
    task = _module_task(head, channels, strides, nc)
    return HeadStrategies(channels, strides, nc, int(getattr(head, "np", 0) or 0), **task)


def _probe_maps(channels, strides) -> list[torch.Tensor]:
    """Seeded feature maps of one TASK_IMAGE (its own generator: the global one is left alone)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, c, feature_size(TASK_IMAGE[0], s), feature_size(TASK_IMAGE[1], s), generator=gen)
            for c, s in zip(channels, strides)]


def _subject_task(subject) -> dict:
    """The task fields of HeadStrategies for a subject, read off one training forward of a copy of its head (and
    its loss's `overlap`, Ultralytics' overlap_mask, for masks)."""
    head = subject.build_head()
    with torch.no_grad():
        preds = subject.train_outputs(head(_probe_maps(subject.channels, subject.strides)))
    loss = subject.build_loss(head) if "masks" in subject.capabilities else None
    return _task_fields(head, preds, loss)


def _module_task(head: nn.Module, channels, strides, nc: int) -> dict:
    """The task fields for a bare head module, from one training forward of a copy of it in a layout it fits."""
    probe = copy.deepcopy(head).train()
    with torch.no_grad():
        out = probe(_probe_maps(channels, strides))
    layout = detect_layout(out)
    if layout is None:
        return {}
    return _task_fields(probe, layout.parse_train(out, Geometry(nc, int(getattr(head, "reg_max", 1)))), None)


def _task_fields(head: nn.Module, preds, loss) -> dict:
    fields = {}
    if "keypoints" in preds:
        fields["keypoint_shape"] = _keypoint_shape_of(head, int(preds["keypoints"].shape[1]))
    if "angles" in preds:
        fields["rotated"] = True
    if "prototypes" in preds:
        fields["mask_size"] = tuple(int(v) for v in preds["prototypes"].shape[-2:])
        fields["mask_overlap"] = bool(getattr(loss, "overlap", True))
    return fields


def _keypoint_shape_of(head: nn.Module, channels: int) -> tuple[int, int]:
    """(nk, ndim) of a keypoint output of `channels` per anchor: the head's `kpt_shape` (Ultralytics' attribute)
    when it matches, else ndim 3 (x, y, visibility) when the channels divide by 3, else 2."""
    declared = getattr(head, "kpt_shape", None)
    if declared is not None and len(declared) == 2 and int(declared[0]) * int(declared[1]) == channels:
        return int(declared[0]), int(declared[1])
    for ndim in (3, 2):
        if channels % ndim == 0:
            return channels // ndim, ndim
    raise InvalidArgument(f"a keypoint output of {channels} channels per anchor is neither nk * 3 nor nk * 2, and the "
                          f"head declares kpt_shape={declared!r}")


def _input_channels(head: nn.Module, levels: int) -> tuple[int, ...]:
    for child in head.children():
        if isinstance(child, nn.ModuleList) and len(child) == levels:
            firsts = [next((m for m in branch.modules() if isinstance(m, nn.Conv2d)), None) for branch in child]
            if all(f is not None for f in firsts):
                return tuple(f.in_channels for f in firsts)
    raise InvalidArgument(f"from_head could not find a per-level nn.ModuleList of {levels} conv branches on the head")




# -------------------------------------------------------------------------------------------------- seeded inputs
def ordinary_targets(subject, batch: int, *, per_image: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded, unremarkable objects: boxes 30-60 % of the image, convex polygons inscribed in them, and the targets of
    the head's other tasks for those boxes (visible keypoints, rotated boxes, masks: `strategies.task_targets`)."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * per_image
    wh = 0.3 + 0.3 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    out = {
        "batch_idx": torch.arange(batch).repeat_interleave(per_image).float(),
        "cls": torch.randint(0, subject.nc, (n, 1), generator=gen).float(),
        "bboxes": torch.cat((centre, wh), 1),
    }
    npv = subject.num_vertices
    if npv:
        angle = torch.arange(npv) * (2 * math.pi / npv) + torch.rand(n, 1, generator=gen)
        out["polygons"] = torch.stack(
            (centre[:, :1] + wh[:, :1] / 2 * angle.cos(), centre[:, 1:] + wh[:, 1:] / 2 * angle.sin()), -1
        )
        out["polygon_mask"] = torch.ones(n, npv, dtype=torch.bool)
    return from_head(subject).task_targets(out, batch_size=batch, seed=seed)


# ------------------------------------------------------------------------------------------------ declared inputs
def _as_is(subject, value):
    return value


@dataclasses.dataclass(frozen=True)
class Input:
    """One input a check declares in its registration (`registry.check(inputs={name: Input})`): what it draws, in
    words (`headguard list` shows it), the strategy bound to a subject, and how an explicit example given as a
    recipe (a MapRecipe, an Initialisation, a number) becomes the value the check receives."""

    describes: str
    bind: Callable[[Any], st.SearchStrategy]
    materialise: Callable[[Any, Any], Any] = _as_is

    def strategy(self, subject) -> st.SearchStrategy:
        return self.bind(subject)

    def example(self, subject, value):
        return self.materialise(subject, value)


# What a head sees from a backbone that ends in BatchNorm + SiLU: per-channel values of order 1. Checks that judge
# the *values* of the initial predictions draw from here; finiteness checks draw the extremes of `magnitudes()`.
TYPICAL_MAGNITUDES = (0.5, 2.0)


def typical_magnitudes() -> st.SearchStrategy[float]:
    """Feature scales of ordinary training: 1 first, then anything in TYPICAL_MAGNITUDES."""
    return st.just(1.0) | st.floats(*TYPICAL_MAGNITUDES)


def min_image_side(subject) -> int:
    """The smallest image side that gives the coarsest level 2 cells: train-mode BatchNorm needs > 1 value per
    channel on a batch of one."""
    return int(max(subject.strides)) + 1


def drawn_feature_maps(*, min_batch: int = 1, max_batch: int = 3, min_size: int | None = None, max_size: int = 96,
                       typical: bool = False, fills: Sequence[str] = FILLS, layouts: Sequence[str] = LAYOUTS) -> Input:
    """Feature maps for the subject's levels: batch sizes, odd and non-square images from `min_size` (None: the
    smallest that gives every level 2 cells) up to `max_size` px, layouts, fills, and magnitudes from 0 to 1e4
    (`typical`: of order 1)."""
    scale = f"magnitudes {TYPICAL_MAGNITUDES[0]:g}-{TYPICAL_MAGNITUDES[1]:g}" if typical else "magnitudes 0, 1e-30 .. 1e4"
    describes = (f"feature maps (batch {min_batch}-{max_batch}, images up to {max_size} px, {scale}, "
                 f"{'/'.join(fills)}, {'/'.join(layouts)})")

    def bind(subject):
        low = min_image_side(subject) if min_size is None else min_size
        sizes = image_sizes(min_size=low, max_size=max(max_size, low))
        return from_head(subject).feature_maps(
            min_batch=min_batch, max_batch=max_batch, image_sizes=sizes,
            magnitudes=typical_magnitudes() if typical else magnitudes(), fills=fills, layouts=layouts)

    return Input(describes, bind, lambda subject, recipe: make_feature_maps(subject.channels, subject.strides, recipe))


def drawn_initialisations(**kwargs) -> Input:
    """`initialisations(**kwargs)`: the shipped init, scaled and perturbed conv weights."""
    return Input("initialisations (as shipped; conv weights scaled 1e-3 .. 1e2, perturbed by 0-1 sd noise)",
                 lambda subject: initialisations(**kwargs))


def drawn_training_batches(*, min_batch: int = 1, max_batch: int = 3, min_per_image: int = 0, max_per_image: int = 2,
                           max_size: int = 96, box_kinds: Sequence[str] = BOX_KINDS,
                           polygon_kinds: Sequence[str] = POLYGON_KINDS, magnitudes: Sequence[float] | None = None,
                           fills: Sequence[str] = ("normal",), layouts: Sequence[str] = ("contiguous",)) -> Input:
    """TrainingBatch (feature maps of typical magnitude, a target batch of the same images): odd and non-square images
    up to `max_size` px, each with `min_per_image`..`max_per_image` objects of `box_kinds` (empty, one, many, tiny,
    at the borders, of every level's size; restrict the kinds for a property that needs positives, which degenerate
    objects may not get), with the head's other tasks' targets. The maps are of typical magnitude, normal and
    contiguous, unless `magnitudes` (sampled from), `fills` and `layouts` say otherwise. An explicit example is a
    MapRecipe: its maps, and `ordinary_targets` seeded alike."""
    _check_range(min_per_image, max_per_image, "min_per_image", "max_per_image")
    scales = "typical" if magnitudes is None else f"magnitude {', '.join(f'{m:g}' for m in magnitudes)}"
    describes = (f"training batches (batch {min_batch}-{max_batch}, images up to {max_size} px, {scales} "
                 f"{'/'.join(fills)} {'/'.join(layouts)} feature maps, {min_per_image}-{max_per_image} objects per "
                 f"image: {'/'.join(box_kinds)})")

    def bind(subject):
        bound = from_head(subject)
        low = min_image_side(subject)
        maps = bound.feature_maps(min_batch=min_batch, max_batch=max_batch,
                                  image_sizes=image_sizes(min_size=low, max_size=max(max_size, low)),
                                  magnitudes=typical_magnitudes() if magnitudes is None else st.sampled_from(magnitudes),
                                  fills=fills, layouts=layouts)
        image = bound.targets(batch_size=1, min_objects=min_per_image, max_objects=max_per_image,
                              box_kinds=box_kinds, polygon_kinds=polygon_kinds)
        return _per_image_batches(maps, image)

    def materialise(subject, recipe: MapRecipe) -> TrainingBatch:
        feats = make_feature_maps(subject.channels, subject.strides, recipe)
        return TrainingBatch(feats, TargetBatch(ordinary_targets(subject, recipe.batch, seed=recipe.seed)))

    return Input(describes, bind, materialise)


@st.composite
def _per_image_batches(draw, maps: st.SearchStrategy, image: st.SearchStrategy) -> TrainingBatch:
    feats = draw(maps, label="feats")
    images = [draw(image, label=f"image {i}") for i in range(feats[0].shape[0])]
    return TrainingBatch(feats, _joined(images))


def _joined(images) -> TargetBatch:
    """One batch of single-image batches, in order: rows grouped by image, as a collate makes them. Every entry has
    one row per object or (index masks) one per image, so each is concatenated along dim 0."""
    joined = {}
    for key in images[0]:
        if key == "batch_idx":
            joined[key] = torch.cat([torch.full((len(b[key]),), float(i)) for i, b in enumerate(images)])
        else:
            joined[key] = torch.cat([b[key] for b in images])
    return TargetBatch(joined)


def drawn(strategy: st.SearchStrategy, describes: str) -> Input:
    """A subject-independent strategy as a declared input (a learning rate, a dtype)."""
    _check_strategy(strategy, "strategy")
    return Input(describes, lambda subject: strategy)
