"""The kit for writing a check (the built-in ones use it too): the `check` decorator and what a check may raise,
the declared inputs (`headguard.strategies`), seeded inputs for a subject, running head and loss with failures
worded for the head's author, finding branches and their final convs, and `run_property` for a check that runs
more than one property.

    from headguard import strategies as hs
    from headguard.testing import CheckFailure, check, train_preds

    @check(area="forward", inputs={"feats": hs.drawn_feature_maps()})
    def check_scores_are_finite(subject, ctx, feats):
        "Training-mode class logits are finite."
        preds = train_preds(subject, subject.build_head(), feats)
        if not bool(preds["scores"].isfinite().all()):
            raise CheckFailure("the class logits hold non-finite values")

Register it before the run (import the module that defines it; `headguard check --select` names it) or call it
directly: `check_scores_are_finite` is then a `registry.Check`, and `check_scores_are_finite(subject)` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from headguard.isolation import is_out_of_memory
from headguard.layouts import LayoutMismatch
from headguard.properties import is_crash, run_property
from headguard.registry import Check, CheckContext, CheckFailure, CheckSkipped, Variant, check, readable, variants
from headguard.strategies import Input, is_per_image, ordinary_targets
from headguard.tracing import locate_nonfinite
from headguard.training import all_finite

# Small images keep the anchor count A small (64 x 80 px -> A = 80 + 20 + 6 = 106 at strides 8/16/32).
IMAGE_SIZE = (64, 80)


# -------------------------------------------------------------------------------------------------------- inputs
def features(
    subject, *, batch: int = 2, image_size=IMAGE_SIZE, seed: int = 0, scale: float = 1.0
) -> list[torch.Tensor]:
    """Seeded standard-normal feature maps (times `scale`) with the shapes the subject expects for `image_size`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * scale for shape in subject.feature_shapes(image_size, batch)]


def select_images(batch: Mapping[str, torch.Tensor], images: list[int]) -> dict[str, torch.Tensor]:
    """The objects of `images` (in that order), re-indexed 0..len(images)-1; per-image entries (index masks) are
    taken by image, their values (indices within each image) stay valid."""
    rows, idx = [], []
    for new, old in enumerate(images):
        r = (batch["batch_idx"] == old).nonzero().flatten()
        rows.append(r)
        idx.append(torch.full((len(r),), float(new)))
    rows_t = torch.cat(rows)
    out = {k: v[torch.tensor(images)] if is_per_image(k, v) else v[rows_t] for k, v in batch.items()
           if k != "batch_idx"}
    out["batch_idx"] = torch.cat(idx)
    return out


def anchor_grid(feats, strides) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre anchors (A, 2) as (x, y) in grid units and strides (A,), float64, levels in order, row-major.

    Written here rather than imported from the reference heads, so a check never inherits a head's own anchor bug.
    """
    points, steps = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[-2:]
        gy, gx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2).double())
        steps.append(torch.full((h * w,), float(s), dtype=torch.float64))
    return torch.cat(points), torch.cat(steps)


def documented_decode(preds: Mapping[str, Any], feats, strides) -> tuple[torch.Tensor, list[int]]:
    """(the documented decode in float64, the rows of eval y it gives) from the raw training outputs: DFL
    expectation -> ltrb distances -> xywh pixels; sigmoid scores; vertices (2 * raw + anchor - 0.5) * stride.
    Rows with no documented decode here are left out: rotated boxes (their xywh depend on the angle), keypoints,
    angles and mask coefficients."""
    points, steps = anchor_grid(feats, strides)
    anchor, stride = points.T.unsqueeze(0), steps.view(1, 1, -1)  # (1, 2, A), (1, 1, A)
    raw = preds["boxes"].double()
    b, c, a = raw.shape
    reg_max = c // 4
    if reg_max > 1:
        bins = torch.arange(reg_max, dtype=torch.float64).view(1, 1, reg_max, 1)
        dist = (raw.view(b, 4, reg_max, a).softmax(2) * bins).sum(2)
    else:
        dist = raw
    lt, rb = dist[:, :2], dist[:, 2:]
    xywh = torch.cat(((anchor + (rb - lt) / 2), lt + rb), 1) * stride
    nc = preds["scores"].shape[1]
    parts, rows = [preds["scores"].double().sigmoid()], list(range(4, 4 + nc))
    if "angles" not in preds:
        parts, rows = [xywh, *parts], [0, 1, 2, 3, *rows]
    if "polygons" in preds:
        poly = preds["polygons"].double()
        npv = poly.shape[1] // 2
        xy = poly.view(b, npv, 2, a)
        parts.append(((2 * xy + anchor.unsqueeze(1) - 0.5) * stride.unsqueeze(1)).view(b, 2 * npv, a))
        rows += list(range(4 + nc, 4 + nc + 2 * npv))
    return torch.cat(parts, 1), rows


def detached_preds(preds: Mapping[str, Any], *, requires_grad: bool = False, dtype=None) -> dict[str, Any]:
    """Leaf copies of the head's prediction tensors, so gradients can be read and inputs compared."""
    out = {}
    for k, v in preds.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if dtype is not None:
                t = t.to(dtype)
            out[k] = t.requires_grad_(requires_grad)
        elif isinstance(v, list):
            out[k] = [t.detach().clone() for t in v]
        else:
            out[k] = v
    return out


def fit_boxes_to_first_object(preds: Mapping[str, Any], batch: Mapping[str, torch.Tensor], strides) -> dict[str, Any]:
    """Predictions whose DFL boxes reproduce each image's FIRST object exactly at every anchor inside it.

    Why: losses normalise by max(1, sum of target scores); at init that sum is often below 1, and the clamp then
    breaks scale properties (replication) for a reason that is not a bug. With one object fitted (IoU ~ 1 at its
    anchors) the sum is >= 1 per image, so the clamp is inactive. Distances are written as a two-bin mix, whose
    softmax expectation is the exact distance (clipped to the DFL range).
    """
    out = dict(preds)
    boxes = preds["boxes"]
    b, c, a = boxes.shape
    reg_max = c // 4
    if reg_max < 2:
        return out
    feats = preds["feats"]
    anchor, stride = anchor_grid(feats, strides)
    img_h, img_w = feats[0].shape[-2] * float(strides[0]), feats[0].shape[-1] * float(strides[0])
    logits = torch.full((b, 4, reg_max, a), -30.0)
    for i in range(b):
        rows = (batch["batch_idx"] == i).nonzero().flatten()
        if len(rows) == 0:
            continue
        cx, cy, w, h = batch["bboxes"][rows[0], :4].double().tolist()  # xywh (an OBB's angle column follows)
        x1, y1, x2, y2 = (cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h
        px, py = anchor[:, 0] * stride, anchor[:, 1] * stride
        ltrb = torch.stack((px - x1, py - y1, x2 - px, y2 - py)) / stride  # (4, A) in cells
        ltrb = ltrb.clamp(0, reg_max - 1 - 1e-4)
        low = ltrb.floor().long()
        frac = ltrb - low
        sel = torch.arange(a)
        for side in range(4):
            logits[i, side, low[side], sel] = torch.log((1 - frac[side]).clamp(min=1e-12)).float()
            logits[i, side, low[side] + 1, sel] = torch.log(frac[side].clamp(min=1e-12)).float()
    out["boxes"] = logits.view(b, c, a).to(boxes.dtype)
    return out


def train_preds(subject, head: nn.Module, feats) -> dict[str, Any]:
    """The named outputs (see `headguard.layouts`) of the head's training forward on `feats`."""
    head.train()
    out = call("the head's training forward", head, list(feats))
    try:
        return subject.train_outputs(out)
    except LayoutMismatch as err:
        raise CheckFailure(str(err)) from None


def eval_outputs(subject, head: nn.Module, feats, *, what: str = "the head's eval forward"):
    """(y, named outputs) of the head's eval forward on `feats` (the head is put in eval mode, gradients off)."""
    head.eval()
    with torch.no_grad():
        out = call(what, head, list(feats))
    try:
        return subject.eval_outputs(out)
    except LayoutMismatch as err:
        raise CheckFailure(str(err)) from None


def call(what: str, fn: Callable, *args, **kwargs):
    """Run `fn`; an exception becomes a CheckFailure naming `what` (the head or loss raised on valid input), except
    an allocation failure, which is the machine's limit, not the subject's bug."""
    try:
        return fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as err:  # noqa: BLE001  (any error on valid input is the finding)
        if is_out_of_memory(err):
            raise
        raise CheckFailure(f"{what} raised {type(err).__name__} on valid input: {err}") from err


def first_bad_gradient(grads: Mapping[str, torch.Tensor | None]) -> str | None:
    """The key of the first gradient that holds a non-finite value, else None (a missing gradient is not
    non-finite: see `missing_gradient`)."""
    return next((k for k, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())), None)


def missing_gradient(grads: Mapping[str, torch.Tensor | None], *, situation: str) -> CheckFailure | None:
    """The finding for the first prediction the loss left without a gradient (None), else None. Its own finding,
    not a non-finite one: the value is fine, the branch is simply unused in that step."""
    key = next((k for k, g in grads.items() if g is None), None)
    if key is None:
        return None
    return CheckFailure(
        f"the loss leaves preds[{key!r}] without a gradient (None) {situation}: that branch is unused in such a "
        "step, and under DistributedDataParallel without find_unused_parameters=True the step fails; keep the "
        "term in the graph (multiply it by zero instead of skipping it)"
    )


def unusable_gradient(grads: Mapping[str, torch.Tensor | None], *, situation: str) -> str | None:
    """The key of the first non-finite gradient, else None; raises `missing_gradient`'s finding first when the loss
    left a prediction without a gradient (that is its own finding, not a non-finite one)."""
    unused = missing_gradient(grads, situation=situation)
    if unused is not None:
        raise unused
    return first_bad_gradient(grads)


def count_nonfinite(t: torch.Tensor | None) -> str:
    if t is None:
        return "no gradient at all (None)"
    bad = int((~torch.isfinite(t)).sum())
    return f"{bad} of {t.numel()} values non-finite"


def items_close(a: Mapping, b: Mapping, *, rtol: float, atol: float) -> list[str]:
    """Names (with values) of items that differ beyond tolerance; also reports different keys."""
    if set(a) != set(b):
        return [f"item keys differ: {sorted(a)} vs {sorted(b)}"]
    bad = []
    for k in a:
        x, y = float(a[k]), float(b[k])
        if not (math.isclose(x, y, rel_tol=rtol, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
            bad.append(f"{k}: {x:.6g} vs {y:.6g}")
    return bad


def where_nonfinite(head: nn.Module, run: Callable[[nn.Module], Any], *, backward: bool = True) -> str:
    """' (first non-finite value in cv2.0.1.bn during the forward pass: ...)', or '' when it cannot be located."""
    try:
        origin = locate_nonfinite(head, run, backward=backward)
    except Exception:  # noqa: BLE001  (locating is a courtesy; the finding stands without it)
        return ""
    return f" ({origin})" if origin is not None else ""


# ---------------------------------------------------------------------------------------------- head structure
def branches(head: nn.Module, levels: int) -> list[tuple[str, nn.ModuleList]]:
    """Top-level ModuleList children with one item per level, each containing a Conv2d: the per-level branches."""
    found = []
    for name, child in head.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == levels:
            if all(any(isinstance(m, nn.Conv2d) for m in item.modules()) for item in child):
                found.append((name, child))
    return found


def final_convs(head: nn.Module, feats) -> list[tuple[str, int, str, nn.Conv2d]]:
    """(branch, level, qualified name, conv) of the LAST Conv2d each branch item runs, in execution order.

    Found by hooking every Conv2d during one training forward, not by `[-1]` indexing, so branches built from
    nested Sequentials or custom blocks are handled the same way.
    """
    order: list[nn.Module] = []
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(lambda mod, a, o: order.append(mod)) for m in convs]
    try:
        with torch.no_grad():
            head.train()(list(feats))
    finally:
        for h in handles:
            h.remove()
    names = {m: n for n, m in head.named_modules()}
    out = []
    for bname, blist in branches(head, len(feats)):
        for level, item in enumerate(blist):
            members = {m for m in item.modules() if isinstance(m, nn.Conv2d)}
            ran = [m for m in order if m in members]
            if ran:
                out.append((bname, level, names[ran[-1]], ran[-1]))
    return out


def branch_by_out_channels(finals, out_channels: int) -> list[str]:
    """Names of branches whose final convs all produce `out_channels` channels."""
    by_branch: dict[str, list[int]] = {}
    for bname, _level, _name, conv in finals:
        by_branch.setdefault(bname, []).append(conv.out_channels)
    return [b for b, outs in by_branch.items() if all(o == out_channels for o in outs)]


def configured_prior(head: nn.Module, level: int, stride: float) -> float:
    """The head's own `class_prior(level)` when it has one, else the Ultralytics convention it documents:
    5 objects per 640 px image spread over nc classes and (640 / stride)^2 cells."""
    if callable(getattr(head, "class_prior", None)):
        return float(head.class_prior(level))
    return 5.0 / head.nc / (640.0 / stride) ** 2


__all__ = [
    "Check",
    "CheckContext",
    "CheckFailure",
    "CheckSkipped",
    "Input",
    "Variant",
    "variants",
    "IMAGE_SIZE",
    "all_finite",
    "anchor_grid",
    "branch_by_out_channels",
    "branches",
    "call",
    "check",
    "configured_prior",
    "count_nonfinite",
    "detached_preds",
    "documented_decode",
    "eval_outputs",
    "features",
    "final_convs",
    "first_bad_gradient",
    "missing_gradient",
    "readable",
    "unusable_gradient",
    "items_close",
    "ordinary_targets",
    "is_crash",
    "run_property",
    "select_images",
    "train_preds",
    "where_nonfinite",
]
