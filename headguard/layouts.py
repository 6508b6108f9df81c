"""Output layouts: how a head kind arranges its training and eval outputs, translated to and from named outputs.

Checks read only named outputs, the canonical dict `{"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats":
[per-level maps], <extras>}` where the extras are "polygons" (B, 2*np, A), "keypoints" (B, nk*ndim, A), "angles"
(B, 1, A), "mask_coefficients" (B, nm, A) and "prototypes" (B, nm, H, W). A layout parses what a head returns into
that dict (`parse_train`, `parse_eval`) and packs the dict back into what the head's own loss expects
(`pack_train`), so a check means the same thing for every layout. Shipped:

- `ULTRALYTICS_84` ("ultralytics-8.4"): the dict Ultralytics 8.4's Detect, Segment, Pose and OBB return (and our
  reference heads); eval `(y, preds)`, Segment's `((y, proto), preds)`.
- `ULTRALYTICS_83` ("ultralytics-8.3"): training returns the list of per-level `(B, 4*reg_max + nc, H, W)` maps; eval
  `(y, x)` with `x` that list.
- `FORK_TUPLE` ("fork-tuple"): the common fork of 8.3: training `(feats, extra)`, eval `(y, (feats, extra))`, the
  extra a `(B, C, A)` tensor (polygon vertices unless the spec names another extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# The canonical name of each extra output, and the keys Ultralytics 8.4 gives them in its dict.
EXTRAS = ("polygons", "keypoints", "angles", "mask_coefficients", "prototypes")
_ULTRALYTICS_KEYS = {"polygons": "polygons", "kpts": "keypoints", "angle": "angles",
                     "mask_coefficient": "mask_coefficients", "proto": "prototypes"}
# What each extra lets a check assume about the head.
_CAPABILITY_OF = {"polygons": "polygons", "keypoints": "keypoints", "angles": "angles",
                  "mask_coefficients": "masks", "prototypes": "masks"}


class LayoutMismatch(ValueError):
    """A head's output does not have the layout's shape; `str()` says what was found and what was expected."""


def describe(value: Any) -> str:
    """A short structural description of an output: 'dict(boxes, scores, feats)', 'tuple of 2', 'list of 3 ...'."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict({', '.join(map(str, value))})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__} of {len(value)} [{inner}]"
    return type(value).__name__


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a layout needs to know about the head to split or join its maps: classes and DFL bins."""

    nc: int
    reg_max: int

    @property
    def box_channels(self) -> int:
        return 4 * self.reg_max


@dataclasses.dataclass(frozen=True)
class Layout:
    """One head kind's output layout (see the module docstring). `extra` names the fork layout's extra output."""

    name: str
    style: str  # "dict", "level-list" or "fork-tuple"
    expects: str  # the training output, in words, for messages
    extra: str = "polygons"

    # --- training outputs ------------------------------------------------------------------------------------------
    def parse_train(self, out: Any, geometry: Geometry) -> dict[str, Any]:
        """The canonical dict of a training forward's output, or LayoutMismatch."""
        if self.style == "dict":
            return _from_dict(out, self)
        if self.style == "level-list":
            return _from_levels(out, geometry, self)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor)):
            raise self.mismatch("training forward", out)
        parsed = _from_levels(out[0], geometry, self)
        return {**parsed, self.extra: out[1]}

    def pack_train(self, preds: Mapping[str, Any], geometry: Geometry) -> Any:
        """The head's own training layout for canonical `preds`: what its loss expects."""
        if self.style == "dict":
            raw_key = {v: k for k, v in _ULTRALYTICS_KEYS.items()}
            return {raw_key.get(k, k): v for k, v in preds.items()}
        levels = _to_levels(preds, geometry)
        return levels if self.style == "level-list" else (levels, preds[self.extra])

    # --- eval outputs ------------------------------------------------------------------------------------------------
    def parse_eval(self, out: Any, geometry: Geometry) -> tuple[torch.Tensor, dict[str, Any]]:
        """(y, canonical preds) of an eval forward's output, or LayoutMismatch. For Segment's `((y, proto), preds)`,
        y is the first element of the inner pair."""
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise self.mismatch("eval forward", out, expected="(y, preds)")
        y, rest = out
        if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
            y = y[0]
        if not isinstance(y, torch.Tensor):
            raise self.mismatch("eval forward", out, expected="(y, preds) with y a (B, rows, A) tensor")
        return y, self.parse_train(rest, geometry)

    def mismatch(self, where: str, out: Any, *, expected: str | None = None) -> LayoutMismatch:
        found = describe(out)
        hint = ""
        other = next((lay for lay in LAYOUTS.values() if lay is not self and lay.looks_like(out)), None)
        if other is not None:
            hint = f"; it looks like the {other.name} layout: pass HeadSpec(layout={other.name!r})"
        return LayoutMismatch(f"the head's {where} returned {found}; the {self.name} layout expects "
                              f"{expected or self.expects}{hint}")

    def looks_like(self, out: Any) -> bool:
        """A cheap structural test (no geometry), for hints and for detecting the layout of a training output."""
        if self.style == "dict":
            return isinstance(out, Mapping) and {"boxes", "scores"} <= set(out)
        if self.style == "level-list":
            return isinstance(out, list) and bool(out) and all(_is_map(t) for t in out)
        return (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], list)
                and all(_is_map(t) for t in out[0]) and isinstance(out[1], torch.Tensor) and out[1].ndim == 3)


def _is_map(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 4


def _from_dict(out: Any, layout: Layout) -> dict[str, Any]:
    if not isinstance(out, Mapping):
        raise layout.mismatch("training forward", out)
    missing = [k for k in ("boxes", "scores", "feats") if k not in out]
    if missing:
        raise LayoutMismatch(f"the head's output dict lacks {missing} (has {sorted(map(str, out))}); the "
                             f"{layout.name} layout expects {layout.expects}")
    return {_ULTRALYTICS_KEYS.get(k, k): v for k, v in out.items()}


def _from_levels(out: Any, geometry: Geometry, layout: Layout) -> dict[str, Any]:
    if not (isinstance(out, (list, tuple)) and out and all(_is_map(t) for t in out)):
        raise layout.mismatch("training forward", out)
    channels = geometry.box_channels + geometry.nc
    bad = [tuple(t.shape) for t in out if t.shape[1] != channels]
    if bad:
        raise LayoutMismatch(f"the head's per-level maps have shapes {bad}; the {layout.name} layout expects "
                             f"(B, 4*reg_max + nc = {channels}, H, W) with reg_max={geometry.reg_max}, "
                             f"nc={geometry.nc}")
    flat = torch.cat([t.flatten(2) for t in out], 2)
    boxes, scores = flat.split((geometry.box_channels, geometry.nc), 1)
    return {"boxes": boxes, "scores": scores, "feats": list(out)}


def _to_levels(preds: Mapping[str, Any], geometry: Geometry) -> list[torch.Tensor]:
    """Per-level (B, 4*reg_max + nc, H, W) maps from canonical boxes and scores, split by the feats' sizes."""
    joined = torch.cat((preds["boxes"], preds["scores"]), 1)
    sizes = [f.shape[-2] * f.shape[-1] for f in preds["feats"]]
    return [part.reshape(*part.shape[:2], *f.shape[-2:])
            for part, f in zip(joined.split(sizes, 2), preds["feats"])]


ULTRALYTICS_84 = Layout(
    "ultralytics-8.4", "dict",
    "a dict with 'boxes' (B, 4*reg_max, A), 'scores' (B, nc, A), 'feats' and any extras (polygons, kpts, angle, "
    "mask_coefficient, proto)",
)
ULTRALYTICS_83 = Layout(
    "ultralytics-8.3", "level-list", "a list of per-level (B, 4*reg_max + nc, H, W) maps",
)
FORK_TUPLE = Layout(
    "fork-tuple", "fork-tuple", "a tuple (per-level (B, 4*reg_max + nc, H, W) maps, extra (B, C, A))",
)
LAYOUTS = {layout.name: layout for layout in (ULTRALYTICS_84, ULTRALYTICS_83, FORK_TUPLE)}


def layout_named(name: str | Layout) -> Layout:
    if isinstance(name, Layout):
        return name
    if name not in LAYOUTS:
        raise LayoutMismatch(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(train_out: Any) -> Layout | None:
    """The one shipped layout a training output fits structurally, or None when none or several do."""
    fits = [layout for layout in LAYOUTS.values() if layout.looks_like(train_out)]
    return fits[0] if len(fits) == 1 else None


def capabilities_of(preds: Mapping[str, Any]) -> frozenset[str]:
    """What the named outputs let checks assume: "polygons", "keypoints", "angles", "masks"."""
    return frozenset(_CAPABILITY_OF[k] for k in preds if k in _CAPABILITY_OF)


def extra_channels(preds: Mapping[str, Any], names: Sequence[str] = EXTRAS) -> int:
    """Per-anchor channels of the extras that eval's y carries after the boxes and scores (prototypes are not)."""
    return sum(int(preds[k].shape[1]) for k in names if k in preds and k != "prototypes")


__all__ = [
    "EXTRAS", "FORK_TUPLE", "Geometry", "LAYOUTS", "Layout", "LayoutMismatch", "ULTRALYTICS_83", "ULTRALYTICS_84",
    "capabilities_of", "describe", "detect_layout", "extra_channels", "layout_named",
]
