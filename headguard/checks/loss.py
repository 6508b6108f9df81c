"""Loss properties: rejecting non-finite predictions (R8), background-only batches (R10), batch replication (R4)
and decomposition (R5), target order, degenerate targets (R6), dtypes, purity, finite gradients (R7), assigner
coverage (R11); for polygon heads, detection terms equal to the detection loss's (R3) and a usable vertex gradient at
init (R2). Absolute properties, on predictions built from the documented decode: every term at its minimum at an
exact fit, per-object terms that decompose over objects, and a declared loss family's reference values."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import assume
from hypothesis import strategies as st

import losses

from headguard import strategies as hs
from headguard.adapters.ultralytics import detection_loss as ultralytics_detection_loss
from headguard.testing import (
    all_finite,
    anchor_grid,
    call,
    check,
    count_nonfinite,
    detached_preds,
    features,
    fit_boxes_to_first_object,
    items_close,
    ordinary_targets,
    readable,
    select_images,
    train_preds,
    unusable_gradient,
    variants,
)
from headguard.reference import LOSS_FAMILIES
from headguard.registry import CheckContext, CheckFailure, CheckSkipped

PRED_KEYS = ("boxes", "scores", "polygons")
DETECTION_ITEMS = ("box_loss", "cls_loss", "dfl_loss")
# Loss items computed from the same numbers in another order agree to float32 summation error.
RTOL, ATOL = 1e-4, 1e-6


def _setup(subject, ctx, *, batch: int = 2, image_size=(64, 64), seed_offset: int = 0):
    """(head, loss, preds detached) for seeded features."""
    head = subject.build_head()
    feats = features(subject, batch=batch, image_size=image_size, seed=ctx.seed + seed_offset)
    preds = detached_preds(train_preds(subject, head, feats))
    return head, subject.build_loss(head), preds


def _pred_keys(preds):
    return [k for k in PRED_KEYS if k in preds]


def _loss(loss, preds, batch, what="the loss"):
    vector, items = call(what, loss, preds, batch)
    return vector, {k: float(v) for k, v in items.items()}


NONFINITE_VALUES = (math.nan, math.inf, -math.inf)


def _contrast_scene_inputs() -> hs.Input:
    """The few scenes of `_contrast_scenes` on the subject's grid (sized from its strides and DFL bins)."""

    def bind(subject):
        setting = _absolute_setup(subject, CheckContext(), exact=False)
        return st.sampled_from(_contrast_scenes(subject, setting.cell, setting.max_cells))

    return hs.Input("scenes: one small object alone; two of different sizes and classes in one image; the same two "
                    "in two images (on the coarsest stride's grid)", bind)


def _levels() -> hs.Input:
    return hs.Input("pyramid levels (any of the head's strides)",
                    lambda subject: st.integers(0, len(subject.strides) - 1))


# Where the value sits and what it is decide the outcome; the scene only has to offer positives and background, so it
# is one of a few (a drawn scene's many choices cost the shrinker tens of seconds on a failing loss).
@check(area="loss", inputs={"scene": _contrast_scene_inputs(),
                            "value": hs.drawn(st.sampled_from(NONFINITE_VALUES), "non-finite values nan, inf, -inf"),
                            "level": _levels()})
def check_loss_rejects_nonfinite(subject, ctx, scene, value, level):
    """A NaN/Inf prediction makes the loss raise a clear error; never a quiet finite scalar (R8).

    Contrasting controls, so the message names the behaviour: in each output, the value at a positive anchor (an
    object's fitted, confident representative, see the absolute properties below) against the same value at an
    anchor inside no object. Raising on both is right. A finite loss with it at a positive means the value was
    replaced (R8). A finite and unchanged loss with it only inside no object means the loss never reads that
    prediction there: right for the box and vertex branches (scored at positives only, as in Ultralytics' loss),
    wrong for class logits (every anchor's logits are scored: that is how background is learnt).

    The controls stay within one example, not variants: the anchor inside no object is judged only where the positive
    raises, and against the same scene, value and level."""
    setting = _absolute_setup(subject, ctx, exact=False)
    feats, anchors = _scene_inputs(subject, setting, scene)
    reps = anchors.representative
    batch, preds = _with_tasks(subject, setting, scene, feats,
                               _constructed_preds(setting.outputs, scene, anchors, feats, reps, reps), ctx.seed)
    original, _ = _loss(setting.loss, preds, batch, "the loss on finite predictions")
    row = scene.boxes.shape[0] - 1  # the last object (in image 1 when there are two images)
    image = int(scene.batch["batch_idx"][row])
    on_level = anchors.level == level
    places = {"a positive anchor": int((reps[image] & (anchors.owner[image] == row) & on_level).nonzero()[0]),
              "an anchor inside no object": int(((anchors.owner[image] < 0) & on_level).nonzero()[0])}
    # A channel every loss reads at a positive: the first DFL bin (log-softmax reads them all), the object's class
    # logit, the x of the first vertex (always real).
    channel = {"boxes": 0, "scores": int(scene.batch["cls"][row, 0]), "polygons": 0}
    for key in _pred_keys(preds):

        def outcome(place, key=key):
            bad = detached_preds(preds)
            bad[key][image, channel[key], places[place]] = value
            return _outcome(setting.loss, bad, batch)

        verdict = _nonfinite_verdict(key, value, f"stride {float(subject.strides[level]):g}", outcome,
                                     lambda: original.detach())
        if verdict is not None:
            raise CheckFailure(verdict)


def _contrast_scenes(subject, cell: float, max_cells: int) -> list[_Scene]:
    """One small object alone; two of different sizes and classes (the larger one's polygon padded when np > 3);
    two images."""
    nv, last, big = subject.num_vertices, subject.nc - 1, min(max_cells, 2) - 1
    first = _Object(0, (0, 0, 0, 0), 0, 0.3, nv, False)
    larger = _Object(0, (0, 1, big, 1 + big), last, 1.1, max(3, nv - 2) if nv else 0, True)
    return [_scene_of([first], (2, 2), cell, nv), _scene_of([first, larger], (2, 3), cell, nv),
            _scene_of([first, larger._replace(image=1)], (2, 3), cell, nv)]


def _outcome(loss, preds, batch):
    """("raised", error) or ("finite" / "non-finite", the loss vector)."""
    try:
        vector, _ = loss(preds, batch)
    except Exception as err:  # noqa: BLE001  (any raised error is the wanted outcome, if it says something)
        return "raised", err
    return ("finite" if all_finite(vector) else "non-finite"), vector.detach()


def _nonfinite_verdict(key, value, level: str, outcome, original) -> str | None:
    """The finding for a non-finite preds[key] at a positive anchor, then (only when that is right) at one inside no
    object, both on `level` ("stride 8"), or None. `outcome(place)` runs the loss with the value there, `original()`
    without it."""
    found = {}

    def at(place):
        found[place] = outcome(place)
        kind, result = found[place]
        if kind == "raised" and not str(result).strip():
            return (f"the loss raised {type(result).__name__} with no message for preds[{key!r}] = {value} at "
                    f"{place} ({level})")
        return None

    rule = ("a non-finite prediction must raise an error naming the tensor (never replace it by a constant, never "
            "return a number that an optimizer will step on)")
    how = ("replaced it by a finite value" if math.isnan(value) else
           "replaced it, or computed through it (an infinite logit saturates a sigmoid or softmax to a finite number)")
    unclear = at("a positive anchor")
    if unclear:
        return unclear
    kind, result = found["a positive anchor"]
    if kind == "finite":
        return (f"the loss returned a finite value ({result.tolist()}) for preds[{key!r}] holding {value} at a "
                f"positive anchor ({level}): it {how}, or never reads it there (R8); {rule}")
    if kind == "non-finite":
        return (f"the loss returned a non-finite value ({result.tolist()}) for preds[{key!r}] holding {value} at a "
                f"positive anchor ({level}) without raising; {rule}")
    unclear = at("an anchor inside no object")
    if unclear:
        return unclear
    kind, result = found["an anchor inside no object"]
    if kind == "raised":
        return None
    if kind == "non-finite":
        return (f"the loss returned a non-finite value ({result.tolist()}) for preds[{key!r}] holding {value} at an "
                f"anchor inside no object ({level}) without raising; {rule}")
    without = original()
    if not torch.allclose(result, without):
        return (f"the loss returned a finite value ({result.tolist()}, {without.tolist()} without it) for "
                f"preds[{key!r}] holding {value} at an anchor inside no object ({level}), while at a positive anchor "
                f"it raises: at background anchors it {how} (R8); {rule}")
    if key == "scores":
        return (f"the loss ignores preds['scores'] at anchors inside no object: {value} at one ({level}) leaves the "
                f"loss unchanged ({result.tolist()}) while at a positive anchor it raises. The class term must score "
                f"every anchor's logits (background anchors are how a head learns 'no object'), so a non-finite "
                f"class logit anywhere must raise; {rule}")
    # The box and vertex predictions of an anchor inside no object are never scored: not reading them is right.
    return None


# The fixed input this check ran on before it drew: the shipped head on seeded maps of a 64 px image, batch 2.
SEEDED_MAPS = ({"feats": hs.MapRecipe(batch=2, image_size=(64, 64), magnitude=1.0, fill="normal", layout="contiguous",
                                      seed=0), "init": hs.SHIPPED},)


@check(area="loss", inputs={"feats": hs.drawn_feature_maps(max_size=80), "init": hs.drawn_initialisations()},
       examples=SEEDED_MAPS)
def check_loss_all_background(subject, ctx, feats, init):
    """An empty batch gives a finite loss, box/DFL/polygon terms exactly 0 and finite gradients (R10).

    Whatever the (finite) predictions: the head's outputs on drawn feature maps under drawn initialisations, with
    an empty batch of the same batch size."""
    head = init(subject.build_head())
    preds = detached_preds(train_preds(subject, head, feats), requires_grad=True)
    # Non-finite predictions are the forward checks' finding, and the loss must reject them (R8): not this property.
    assume(all_finite(preds))
    empty = ordinary_targets(subject, feats[0].shape[0], per_image=0, seed=ctx.seed)
    vector, items = _loss(subject.build_loss(head), preds, empty, "the loss on an all-background batch")
    if not all_finite(vector):
        raise CheckFailure(
            f"the loss on an all-background batch is non-finite ({vector.detach().tolist()}): normalise by "
            "max(1, sum of target scores), never by a count that can be 0"
        )
    nonzero = {k: v for k, v in items.items() if k != "cls_loss" and v != 0.0}
    if nonzero:
        raise CheckFailure(
            f"with no objects, the terms {nonzero} are not exactly 0: box/DFL/polygon terms have no positives to "
            "score and must be exactly 0 (no epsilon-shifted or NaN-cleaned values)"
        )
    vector.sum().backward()
    for k in _pred_keys(preds):
        if not all_finite(preds[k].grad):
            raise CheckFailure(
                f"an all-background batch gives non-finite gradients for preds[{k!r}] "
                f"({count_nonfinite(preds[k].grad)}): mask before dividing by the number of positives"
            )


def _drawn_targets(*, batch_size: int, min_objects: int, max_objects: int, box_kinds=hs.BOX_KINDS,
                   polygon_kinds=hs.POLYGON_KINDS) -> hs.Input:
    """Target batches for the subject's classes, vertices and other tasks (`HeadStrategies.targets`)."""
    boxes = "boxes of every kind" if tuple(box_kinds) == hs.BOX_KINDS else f"{'/'.join(box_kinds)} boxes"
    polygons = ("polygons of every kind" if tuple(polygon_kinds) == hs.POLYGON_KINDS
                else f"{'/'.join(polygon_kinds)} polygons")
    describes = (f"target batches ({batch_size} image{'s' if batch_size > 1 else ''}, {min_objects}-{max_objects} "
                 f"objects per batch: {boxes}, {polygons} on a polygon head)")
    return hs.Input(describes, lambda subject: hs.from_head(subject).targets(
        batch_size=batch_size, min_objects=min_objects, max_objects=max_objects, box_kinds=box_kinds,
        polygon_kinds=polygon_kinds))


def _replicate(preds, batch, k):
    out = {}
    for key, v in preds.items():
        out[key] = [f.repeat(k, 1, 1, 1) for f in v] if key == "feats" else v.repeat(k, *([1] * (v.ndim - 1)))
    n = batch["batch_idx"].shape[0]
    rep = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in batch.items() if key != "batch_idx"}
    rep["batch_idx"] = torch.arange(k).repeat_interleave(n).float()
    return out, rep


@check(area="loss", inputs={
    "batch": _drawn_targets(batch_size=1, min_objects=1, max_objects=4, box_kinds=("normal",),
                            polygon_kinds=("convex",)),
    "copies": hs.drawn(st.integers(2, 4), "replication counts 2-4")})
def check_loss_batch_replication(subject, ctx, batch, copies):
    """Loss items are unchanged when one image (predictions and objects) is replicated k times (R4).

    The predictions are the head's outputs on seeded maps of one 64 px image, with boxes fitted to the first of the
    drawn objects."""
    # Boxes fitted to the first object keep the sum of target scores >= 1, so max(1, .) does not clamp; that needs
    # anchors inside it (>= 16 px at stride 8 in a 64 px image).
    assume(float(batch["bboxes"][0, 2:4].min()) >= 0.25)  # w, h (a rotated box's angle is no size)
    _, loss, raw_preds = _setup(subject, ctx, batch=1)
    preds = fit_boxes_to_first_object(raw_preds, batch, subject.strides)
    _, one = _loss(loss, preds, batch)
    many_preds, many_batch = _replicate(preds, batch, copies)
    _, many = _loss(loss, many_preds, many_batch)
    bad = items_close(one, many, rtol=RTOL, atol=ATOL)
    if bad:
        raise CheckFailure(
            f"loss items change when one image is replicated {copies} times: {'; '.join(bad)} (1 image vs {copies} "
            "copies); every term must be a mean over images/positives, not a sum that grows with the batch size"
        )


def _take_images(preds, images):
    idx = torch.tensor(images)
    return {k: ([f[idx] for f in v] if k == "feats" else v[idx]) for k, v in preds.items()}


@check(area="loss", inputs={"batch": _drawn_targets(batch_size=2, min_objects=2, max_objects=5, box_kinds=("normal",),
                                                     polygon_kinds=("convex",))})
def check_loss_batch_decomposition(subject, ctx, batch):
    """Image order does not matter: items of [A, B] equal those of [B, A] (R5).

    Terms a loss declares per-image averaged (attribute `per_image_terms`) must also equal the mean of [A] alone and
    [B] alone. The reference normalises every term by the batch's sum of target scores, so only the swap applies.
    The predictions are the head's outputs on seeded maps of two 64 px images; the objects are drawn."""
    assume(bool((batch["batch_idx"] == 0).any()) and bool((batch["batch_idx"] == 1).any()))
    _, loss, preds = _setup(subject, ctx, batch=2)
    per_image = tuple(getattr(loss, "per_image_terms", ()))
    _, ab = _loss(loss, preds, batch)
    _, ba = _loss(loss, _take_images(preds, [1, 0]), select_images(batch, [1, 0]))
    bad = items_close(ab, ba, rtol=RTOL, atol=ATOL)
    if bad:
        raise CheckFailure(
            f"swapping the two images of a batch changes loss items: {'; '.join(bad)} ([A, B] vs [B, A]); each "
            "positive anchor must be matched to an object of its OWN image (an index into the image's padded "
            "objects is not a row of the flat batch)"
        )
    if per_image:
        _, a = _loss(loss, _take_images(preds, [0]), select_images(batch, [0]))
        _, b = _loss(loss, _take_images(preds, [1]), select_images(batch, [1]))
        mean = {k: (a[k] + b[k]) / 2 for k in per_image}
        bad = items_close({k: ab[k] for k in per_image}, mean, rtol=RTOL, atol=ATOL)
        if bad:
            raise CheckFailure(
                f"per-image terms of [A, B] differ from the mean of [A] and [B] alone: {'; '.join(bad)}; the term "
                "must average each image's own value (objects of one image must not leak into another's)"
            )


# The most objects a reordered batch holds. The order is drawn as a permutation of that many rows, declared beside the
# batch: a batch of n objects takes the order it gives rows 0..n-1 (every order of them equally likely; the identity
# where the permutation shrinks to it).
MAX_REORDERED = 6


# Identical boxes of different classes are a true tie (which class an anchor learns is then order-dependent by any
# rule), so the boxes here are continuous draws, never exact copies.
@check(area="loss", inputs={
    "batch": _drawn_targets(batch_size=2, min_objects=2, max_objects=MAX_REORDERED, box_kinds=("normal", "tiny"),
                            polygon_kinds=("convex", "padded")),
    "order": hs.drawn(st.permutations(range(MAX_REORDERED)),
                      f"object orders (a permutation of 0-{MAX_REORDERED - 1}: a batch of n objects takes the order "
                      "of its rows 0..n-1, kept within each image)")})
def check_loss_target_order_invariant(subject, ctx, batch, order):
    """Permuting the objects of each image (rows of every target tensor together) changes no loss item.

    The predictions are the head's outputs on seeded maps of two 64 px images; the objects and their order are
    drawn."""
    n = batch["batch_idx"].shape[0]
    perm = torch.tensor([i for i in order if i < n], dtype=torch.long)
    # Keep rows grouped by image (the Ultralytics batch convention); shuffle within each image.
    perm = perm[batch["batch_idx"][perm].argsort(stable=True)]
    _, loss, preds = _setup(subject, ctx, batch=2)
    _, before = _loss(loss, preds, batch)
    _, after = _loss(loss, preds, hs.reorder_objects(batch, perm))
    bad = items_close(before, after, rtol=RTOL, atol=ATOL)
    if bad:
        raise CheckFailure(
            f"reordering the objects within an image changes loss items: {'; '.join(bad)}"
            f" (permutation {perm.tolist()});"
            " the loss must not depend on object order (stable per-image grouping, no order-dependent ties)"
        )


DEGENERATE_BOXES = ("tiny", "zero_width", "zero_height", "image_covering", "edge", "duplicate")
DEGENERATE_POLYGONS = ("all_equal", "collinear", "repeated_vertex", "padded")


def _grad_run(loss, preds, batch, dtype):
    """(vector, items, grads) for leaf predictions cast to `dtype`."""
    leaf = detached_preds(preds, requires_grad=True, dtype=dtype)
    leaf["feats"] = [f.to(dtype) for f in leaf["feats"]]
    vector, items = call(f"the loss ({dtype})", loss, leaf, batch)
    grads = {}
    if all_finite(vector) and vector.requires_grad:
        vector.sum().backward()
        grads = {k: leaf[k].grad for k in _pred_keys(leaf)}
    return vector, items, grads


@check(area="loss", inputs={
    "batch": _drawn_targets(batch_size=2, min_objects=1, max_objects=5, box_kinds=DEGENERATE_BOXES,
                            polygon_kinds=DEGENERATE_POLYGONS),
    "dtype": hs.drawn(st.sampled_from((torch.float32, torch.bfloat16)), "prediction dtypes float32, bfloat16")})
def check_loss_finite_degenerate_targets(subject, ctx, batch, dtype):
    """Finite loss and gradients on degenerate targets, for float32 and bfloat16 predictions (R6).

    Families: zero-width/height, tiny, image-covering, edge-touching and duplicate boxes; all-equal, collinear,
    repeated-vertex and padded polygons. The predictions are the head's outputs on seeded maps of two 64 px images,
    cast to the drawn dtype."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    vector, _, grads = _grad_run(loss, preds, batch, dtype)
    if not all_finite(vector):
        raise CheckFailure(
            f"the loss is non-finite ({vector.detach().tolist()}) on degenerate targets in {dtype}: guard every "
            "division (select with a mask BEFORE dividing) and use an epsilon representable in the compute dtype"
        )
    k = unusable_gradient(grads, situation=f"on degenerate targets in {dtype}")
    if k is not None:
        raise CheckFailure(
            f"the gradient w.r.t. preds[{k!r}] is non-finite ({count_nonfinite(grads[k])})"
            f" on degenerate targets in {dtype} although the loss is finite: a division or sqrt at 0 in the "
            "backward pass; mask before dividing"
        )


def _clear(err: Exception) -> bool:
    """A clear rejection: a ValueError/TypeError whose message names a dtype or a tensor of the call."""
    text = str(err)
    return isinstance(err, (ValueError, TypeError)) and ("dtype" in text or "preds" in text or "batch" in text)


PRED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64)


def _targets_in(batch, dtype: torch.dtype) -> dict:
    """`batch` with its entries in `dtype`: every non-boolean entry for a floating dtype, only the integral ones
    (batch_idx, cls) for an integer dtype; boolean masks stay boolean."""
    return {k: v.to(dtype) if v.dtype != torch.bool and (dtype.is_floating_point or k in ("batch_idx", "cls")) else v
            for k, v in batch.items()}


# 16 properties, each a head forward and a loss with backward per example: two examples each keep it under 2 s.
@check(area="loss", inputs={"training": hs.drawn_training_batches(max_batch=2, min_per_image=1,
                                                                 box_kinds=hs.ORDINARY_BOX_KINDS,
                                                                 polygon_kinds=hs.ORDINARY_POLYGON_KINDS)},
       variants=variants(pred=PRED_DTYPES, target=TARGET_DTYPES), max_examples=2)
def check_loss_dtype_matrix(subject, ctx, training, pred, target):
    """Every prediction dtype x target dtype either works (finite loss and gradients) or raises a clear error.

    Each combination is a variant, on drawn training batches of ordinary objects (a NaN on degenerate ones is
    check_loss_finite_degenerate_targets' finding): the head's outputs cast to the prediction dtype, the targets to
    the target dtype."""
    feats, base = training
    head = subject.build_head()
    preds = detached_preds(train_preds(subject, head, feats))
    combination = f"{readable(pred)} predictions with {readable(target)} targets"
    expected = ("; expected finite loss and gradients, or an up-front ValueError/TypeError naming the tensor and its "
                "dtype: ")
    remedy = (f"{expected}compute in a dtype where every epsilon is representable (float32 at least), or reject the "
              "dtype up front")
    try:
        vector, _, grads = _grad_run(subject.build_loss(head), preds, _targets_in(base, target), pred)
    except CheckFailure as failure:
        err = failure.__cause__
        if err is not None and _clear(err):
            return
        # The unclear error is the finding (a failed property, shrunk), not a crash of the check.
        cast = (f"{expected}convert predictions and targets to one compute dtype where the loss reads them, or reject "
                "the dtype up front")
        raise CheckFailure(f"{combination} neither work nor raise a clear error: {failure.message}{cast}") from None
    if not all_finite(vector):
        raise CheckFailure(f"{combination} neither work nor raise a clear error: the loss is non-finite "
                           f"({vector.detach().tolist()}){remedy}")
    bad = {k: g for k, g in grads.items() if g is None or not all_finite(g)}
    if bad or not grads:
        found = "; ".join(f"preds[{k!r}]: {count_nonfinite(g)}" for k, g in bad.items()) or "no gradient at all"
        raise CheckFailure(f"{combination} neither work nor raise a clear error: the loss is finite "
                           f"({vector.detach().tolist()}) but its gradients are not ({found}){remedy}")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape, dtype and values (NaN where the other has NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def _map_shapes(feats) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in feats]


@check(area="loss", inputs={"first": hs.drawn_training_batches(max_batch=2),
                            "other": hs.drawn_training_batches(max_batch=2)}, max_examples=5)
def check_loss_pure(subject, ctx, first, other):
    """Same inputs twice, same outputs; inputs unchanged; no hidden state carried from one call to the next.

    A drawn training batch repeated, then again after a call on another drawn batch of another size."""
    (feats, batch), (other_feats, other_batch) = first, other
    # Another image or batch size: a loss that caches its anchors (or anything shaped by the input) is caught here.
    assume(_map_shapes(feats) != _map_shapes(other_feats))
    head = subject.build_head()
    loss = subject.build_loss(head)
    preds = detached_preds(train_preds(subject, head, feats))
    other_preds = detached_preds(train_preds(subject, head, other_feats))
    saved_preds, saved_batch = detached_preds(preds), {k: v.clone() for k, v in batch.items()}
    v1, i1 = _loss(loss, preds, batch)
    v2, i2 = _loss(loss, preds, batch)
    _loss(loss, other_preds, other_batch, "the loss on the other batch")
    v3, i3 = _loss(loss, preds, batch)
    for label, v, i in (("a repeated call", v2, i2), ("a call after other inputs", v3, i3)):
        changed = items_close(i1, i, rtol=0.0, atol=0.0)
        if not _same_tensor(v1.detach(), v.detach()) or changed:
            raise CheckFailure(
                f"the loss gave a different result on {label} with identical inputs ({v1.tolist()} vs {v.tolist()}"
                f"{'; ' + '; '.join(changed) if changed else ''}); a loss must hold no state between calls (no cached "
                "anchors, running normalisers or counters)"
            )
    for k in _pred_keys(preds):
        if not _same_tensor(preds[k], saved_preds[k]):
            raise CheckFailure(f"the loss modified preds[{k!r}] in place; it must not write into its inputs")
    for k, v in batch.items():
        if not _same_tensor(v, saved_batch[k]):
            raise CheckFailure(f"the loss modified batch[{k!r}] in place; it must not write into its inputs")


GRADIENT_MAGNITUDES = (0.0, 1.0, 1e2)


@check(area="loss", inputs={"training": hs.drawn_training_batches(max_batch=2, max_per_image=3,
                                                                 magnitudes=GRADIENT_MAGNITUDES, fills=hs.FILLS,
                                                                 layouts=hs.LAYOUTS),
                            "init": hs.drawn_initialisations()})
def check_gradients_finite_when_loss_finite(subject, ctx, training, init):
    """Whenever the loss is finite, every gradient is finite (R7: NaN cleaned after a division leaves 0 * inf).

    The head's outputs under a drawn initialisation on drawn feature maps, with drawn targets of the same batch
    size, into that head's loss."""
    feats, batch = training
    head = init(subject.build_head())
    loss = subject.build_loss(head)
    preds = detached_preds(train_preds(subject, head, feats))
    assume(all_finite({k: preds[k] for k in _pred_keys(preds)}))
    vector, _, grads = _grad_run(loss, preds, batch, torch.float32)
    if not all_finite(vector):
        return
    k = unusable_gradient(grads, situation="on this batch")
    if k is not None:
        raise CheckFailure(
            f"the loss is finite ({vector.detach().tolist()}) but its gradient w.r.t. preds[{k!r}] is not "
            f"({count_nonfinite(grads[k])}): a value was cleaned (where/nan_to_num) after a "
            "division whose backward still yields 0 * inf; select with a mask before dividing"
        )


SCORE_LOGITS = (0.0, -20.0, -100.0)
BOX_MODES = ("as_is", "collapsed", "maximal")


# Objects of side >= 0.3 of a 64 px image span >= 19 px, so anchors of the stride-8 level lie inside.
@check(area="loss", inputs={
    "cx": hs.drawn(st.floats(0.25, 0.75), "object centres x 0.25-0.75 (normalised)"),
    "cy": hs.drawn(st.floats(0.25, 0.75), "object centres y 0.25-0.75 (normalised)"),
    "side": hs.drawn(st.floats(0.3, 0.5), "object sides 0.3-0.5 of the 64 px image (a square box; on a polygon "
                                          "head the regular polygon inscribed in it)"),
    "score_logit": hs.drawn(st.sampled_from(SCORE_LOGITS), f"class logits {', '.join(f'{v:g}' for v in SCORE_LOGITS)} "
                                                            "at every anchor"),
    "box_mode": hs.drawn(st.sampled_from(BOX_MODES), "box predictions as the head makes them, collapsed to a point or "
                                                     "blown to the maximum distance")})
def check_assigner_coverage(subject, ctx, cx, cy, side, score_logit, box_mode):
    """For any predictions, every object with anchors inside gets >= 1 positive with non-zero weight (R11).

    Observed from outside: with ONE object in ONE image, a positive with non-zero weight exists iff the box term is
    non-zero (1 - IoU > 0 for any real prediction). Predictions are made wild: class logits far negative and boxes
    collapsed to a point or blown to the maximum distance, so every alignment metric is (close to) 0. They start as
    the head's outputs on seeded maps of one 64 px image.
    """
    _, loss, preds = _setup(subject, ctx, batch=1, image_size=(64, 64))
    reg_max = preds["boxes"].shape[1] // 4
    wild = detached_preds(preds)
    wild["scores"] = wild["scores"] * 0 + score_logit
    if reg_max > 1 and box_mode != "as_is":
        logits = torch.full((1, 4, reg_max, wild["boxes"].shape[-1]), -50.0)
        logits[:, :, 0 if box_mode == "collapsed" else reg_max - 1] = 50.0
        wild["boxes"] = logits.view_as(wild["boxes"])
    batch = {"batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1), "bboxes": torch.tensor([[cx, cy, side, side]])}
    if subject.num_vertices:
        angle = torch.arange(subject.num_vertices) * (2 * math.pi / subject.num_vertices)
        batch["polygons"] = torch.stack((cx + side / 2 * angle.cos(), cy + side / 2 * angle.sin()), -1).unsqueeze(0)
        batch["polygon_mask"] = torch.ones(1, subject.num_vertices, dtype=torch.bool)
    _, items = _loss(loss, wild, hs.from_head(subject).task_targets(batch, batch_size=1))
    if not items["box_loss"] > 0:
        raise CheckFailure(
            f"an object ({cx:.3g}, {cy:.3g}, side {side:.3g}, normalised) with anchors inside it got no positive "
            f"with non-zero weight (box_loss = {items['box_loss']}) under wild predictions (class logit "
            f"{score_logit:g}, boxes {box_mode}): the assigner starved it and the loss hides the miss; guarantee "
            "each such object at least one positive (e.g. its best-centred anchor) with a non-zero target score"
        )


def _detection_oracle(subject, shape_loss):
    """The detection loss whose terms the polygon loss must reproduce: the subject's own detection-loss family
    (`HeadSpec(detection_loss=...)`), else ours for a loss of our family (our PolygonLoss, a declared polygon
    family); a fork's loss of another family (an 8.3 assigner) is never held to our 8.4-equal terms."""
    if subject.detection_loss_factory is not None:
        return subject.detection_loss_factory
    ours = isinstance(getattr(shape_loss, "criterion", shape_loss), losses.PolygonLoss)
    if ours or subject.loss_family in ("polygon", "polygon-mgiou"):
        return losses.DetectionLoss.for_head
    raise CheckSkipped("the subject names no detection loss of its own family (HeadSpec(detection_loss=...)) and its "
                       "loss is not of ours, so there is no oracle for its detection terms")


def _with_an_oracle(declared: hs.Input) -> hs.Input:
    """`declared`, bound only for a subject with a detection-loss oracle: without one the check is skipped before
    the search (`_detection_oracle` raises CheckSkipped), never on its first example."""

    def bind(subject):
        _detection_oracle(subject, subject.build_loss(subject.build_head()))
        return declared.strategy(subject)

    return hs.Input(declared.describes, bind, declared.materialise)


@check(area="loss", requires=("polygons",),
       inputs={"batch": _with_an_oracle(_drawn_targets(batch_size=2, min_objects=0, max_objects=5))})
def check_polygon_detection_terms_match(subject, ctx, batch):
    """The box/cls/dfl items of the polygon loss equal the detection loss's on the same inputs (R3).

    The predictions are the head's outputs on seeded maps of two 64 px images; the objects are drawn."""
    head = subject.build_head()
    feats = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    preds = detached_preds(train_preds(subject, head, feats))
    shape_loss = subject.build_loss(head)
    detection_loss = _detection_oracle(subject, shape_loss)(head)
    _, poly_items = call("the polygon loss", shape_loss, preds, batch)
    det_batch = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}
    det_preds = {k: v for k, v in preds.items() if k != "polygons"}
    _, det_items = call("the detection loss", detection_loss, det_preds, det_batch)
    missing = [k for k in DETECTION_ITEMS if k in det_items and k not in poly_items]
    if missing:
        raise CheckFailure(
            f"the polygon loss's items lack {missing}; expected the detection loss's {list(det_items)} too"
        )
    shared = [k for k in DETECTION_ITEMS if k in det_items]
    bad = items_close({k: float(poly_items[k]) for k in shared}, {k: float(det_items[k]) for k in shared},
                      rtol=1e-5, atol=1e-7)
    if bad:
        raise CheckFailure(
            f"the polygon loss's detection terms differ from the detection loss's on the same inputs: "
            f"{'; '.join(bad)} (polygon loss vs detection loss); adding a shape term must not renormalise the "
            "class or box terms (normalise cls by max(1, sum of target scores), as the detection loss does)"
        )


def _every_image_has_a_positive(subject, feats, batch) -> bool:
    """Each image holds an object of at least 1.5 finest-level cells a side, so finest-level anchor centres lie inside
    it, a quarter cell from its edges (an object of exactly one cell may have centres only on its edges, inside no
    object). Sides in pixels of the image the loss sees: the finest map's size times its stride."""
    stride = float(subject.strides[0])
    height, width = feats[0].shape[-2] * stride, feats[0].shape[-1] * stride
    side = 1.5 * float(min(subject.strides))
    wide = (batch["bboxes"][:, 2] * width >= side) & (batch["bboxes"][:, 3] * height >= side)
    return all(bool(wide[batch["batch_idx"] == i].any()) for i in range(feats[0].shape[0]))


# Initialisations that keep the shipped polygons' spread: scaling the vertex branch's final weights by 1e-3 collapses
# every polygon towards one point (the vertex bias is 0), where a zero gradient is no bug of the head; see R2.
INIT_SCALES, INIT_NOISES = (0.5, 2.0, 10.0), (0.0, 0.1, 1.0)


@check(area="loss", requires=("polygons",),
       inputs={"training": hs.drawn_training_batches(max_batch=2, min_per_image=1, box_kinds=("normal",),
                                                         polygon_kinds=("convex",)),
               "init": hs.drawn(hs.initialisations(scales=INIT_SCALES, noises=INIT_NOISES),
                                "initialisations (as shipped; conv weights scaled 0.5-10, perturbed by 0-1 sd noise)")})
def check_polygon_gradient_at_init(subject, ctx, training, init):
    """The polygon loss's gradient w.r.t. the head's initial vertex output is finite and non-zero (R2).

    On drawn training batches with an object of at least 1.5 finest cells a side in every image, under the shipped
    and perturbed initialisations."""
    feats, batch = training
    assume(_every_image_has_a_positive(subject, feats, batch))
    head = init(subject.build_head())
    preds = detached_preds(train_preds(subject, head, feats))
    preds["polygons"].requires_grad_(True)
    vector, items = call("the polygon loss", subject.build_loss(head), preds, batch)
    if "polygon_loss" not in items:
        raise CheckSkipped(f"the loss reports no 'polygon_loss' item (items: {sorted(items)})")
    vector.sum().backward()
    grad = preds["polygons"].grad
    if grad is None or not bool(torch.isfinite(grad).all()):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is unusable ({count_nonfinite(grad)})"
            f" (polygon_loss = {float(items['polygon_loss']):.4g}, {init!r}): initial polygons are probably "
            "degenerate (all vertices at one point, a 0/0 in the loss); initialise the vertex branch so polygons "
            "have spread"
        )
    if not bool(grad.abs().sum() > 0):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is exactly zero (polygon_loss = "
            f"{float(items['polygon_loss']):.4g}, {init!r}) although every image holds an object with anchors "
            "inside: the initial polygons sit at a stationary point (e.g. every vertex on one point after zeroing "
            "the vertex branch's final weights); they will never start to learn"
        )


# ================================================================================= absolute properties (issue 10)
# The properties above are relative (swap, replicate, permute, purity): a loss that is wrong the same way every time
# passes them. The ones below build predictions from the documented decode, so the right answer is known:
#   boxes: softmax expectation over DFL bins 0..reg_max-1 = (left, top, right, bottom) in stride units, box = anchor
#   -/+ those distances (reg_max = 1: the distances themselves); vertices: (2 * raw + anchor - 0.5) * stride; anchors
#   at cell centres in grid units. Written here, not imported from heads._decode, so a check never inherits the
#   reference's own decode bug.
# Objects are rectangles of whole cells of the coarsest stride (32 px at strides 8/16/32, images of 2-3 cells a side,
# 64-96 px) that never overlap. Why those sizes: an open interval longer than a stride s contains a cell centre
# (k + 0.5) * s of every level with s <= the cell, so every level has anchors inside every object, and no anchor lies
# on an edge or inside two objects. Each object's nearest-to-centre anchor on each level is its representative.

POSITIVE_LOGIT, BACKGROUND_LOGIT = 8.0, -8.0  # sigmoid 0.99966 and 0.00034: a confident positive, a clear background
ABSENT_BIN_LOGIT = -50.0  # the logit of a DFL bin a distribution leaves empty: softmax weight ~2e-22
PER_OBJECT_ITEMS = ("box_loss", "polygon_loss", "dfl_loss")
# An exact fit reproduces the targets to float32 rounding (decoded boxes and vertices within ~1e-6 of a stride): the
# gain-scaled CIoU and vertex terms come out below 1e-5; a wrong term is off by orders more (the fork: 4.8-11.5).
ZERO_ATOL = 1e-4
FLOOR_RTOL = 1e-3


class _Scene(NamedTuple):
    """Separated objects on the coarsest stride's grid, and per-object moves away from the exact fit."""

    image_size: tuple[int, int]  # (h, w) pixels
    batch: dict  # the loss's batch: batch_idx, cls, normalised xywh bboxes (polygons, polygon_mask)
    boxes: torch.Tensor  # (N, 4) xyxy pixels, float64
    polygons: torch.Tensor | None  # (N, np, 2) pixels, float64
    moves: torch.Tensor  # (N, 4): vertex scale about the box centre, vertex dx, dy (pixels), box scale
    spreads: torch.Tensor  # (N,): mean-preserving DFL spread (0: the two-bin target itself)

    def __repr__(self) -> str:
        h, w = self.image_size
        rows = []
        for i, (image, cls, box, move, spread) in enumerate(zip(
                self.batch["batch_idx"].tolist(), self.batch["cls"][:, 0].tolist(), self.boxes.tolist(),
                self.moves.tolist(), self.spreads.tolist())):
            moved = "" if move == [1.0, 0.0, 0.0, 1.0] and spread == 0 else (
                f", vertices x{move[0]:.3g} +({move[1]:.3g}, {move[2]:.3g}) px, box x{move[3]:.3g}, "
                f"DFL spread {spread:.3g}")
            rows.append(f"(img={int(image)}, cls={int(cls)}, xyxy px={[round(v) for v in box]}{moved})")
        return f"Scene({h}x{w} px, [{', '.join(rows)}])"

    def alone(self, row: int) -> dict:
        """The batch with object `row` only (same image index)."""
        return {k: v[row:row + 1] for k, v in self.batch.items()}


class _Object(NamedTuple):
    """One object of a scene: its cells, class and polygon (a regular polygon inscribed in the box's ellipse)."""

    image: int
    cells: tuple[int, int, int, int]  # first row, first col, last row, last col (inclusive)
    cls: int
    phase: float  # the first vertex's angle
    real: int  # real vertices; the rest are padding (masked)
    clockwise: bool


IDENTITY_MOVE = (1.0, 0.0, 0.0, 1.0)


def _scene_of(objects, grid: tuple[int, int], cell: float, num_vertices: int, moves=None, spreads=None) -> _Scene:
    """The scene of `objects` on a (rows, cols) grid of `cell`-pixel cells, with the loss's batch."""
    rows, cols = grid
    boxes = torch.tensor([(c0 * cell, r0 * cell, (c1 + 1) * cell, (r1 + 1) * cell)
                          for _, (r0, c0, r1, c1), *_ in objects], dtype=torch.float64).reshape(-1, 4)
    size = torch.tensor([cols * cell, rows * cell], dtype=torch.float64)
    xywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1) / size.repeat(2)
    batch = {"batch_idx": torch.tensor([o.image for o in objects], dtype=torch.float32),
             "cls": torch.tensor([[float(o.cls)] for o in objects]).reshape(-1, 1), "bboxes": xywh.float()}
    polygons = None
    if num_vertices:
        vertices, masks = [], []
        for o, box in zip(objects, boxes):
            angle = o.phase + 2 * math.pi * torch.arange(o.real, dtype=torch.float64) / o.real
            if o.clockwise:
                angle = -angle
            centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2
            ring = centre + half * torch.stack((angle.cos(), angle.sin()), -1)
            vertices.append(torch.cat((ring, ring[-1:].expand(num_vertices - o.real, 2))))
            masks.append(torch.arange(num_vertices) < o.real)
        polygons = torch.stack(vertices).reshape(-1, num_vertices, 2)
        batch["polygons"] = (polygons / size).float()
        batch["polygon_mask"] = torch.stack(masks).reshape(-1, num_vertices)
    n = len(objects)
    moves = torch.tensor(moves or [IDENTITY_MOVE] * n, dtype=torch.float64).reshape(n, 4)
    spreads = torch.tensor(spreads or [0.0] * n, dtype=torch.float64)
    return _Scene((rows * int(cell), cols * int(cell)), batch, boxes, polygons, moves, spreads)


@st.composite
def _scenes(draw, subject, cell: float, *, batch_size: int, min_objects: int, max_objects: int, max_cells: int,
            moved: bool) -> _Scene:
    """Scenes of `batch_size` images of 2-3 cells a side, each with objects of up to `max_cells` cells a side that
    never overlap and leave at least one cell free (so every image has anchors inside no object); classes drawn,
    polygons convex or padded, either orientation; with `moved`, a move of each object's fit."""
    grid = rows, cols = draw(st.sampled_from(((2, 2), (2, 3), (3, 2), (3, 3))), label="cells (rows, cols)")
    nv, objects = subject.num_vertices, []
    for image in range(batch_size):
        taken: set = set()
        for _ in range(draw(st.integers(min_objects, max_objects), label="objects")):
            free = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in taken]
            if len(free) < 2:
                break
            r0, c0 = draw(st.sampled_from(free), label="top-left cell")
            h, w = draw(st.integers(1, max_cells), label="height"), draw(st.integers(1, max_cells), label="width")
            cells = {(r, c) for r in range(r0, min(r0 + h, rows)) for c in range(c0, min(c0 + w, cols))}
            if cells & taken or len(cells | taken) == rows * cols:
                cells = {(r0, c0)}  # never overlap another object, never cover the whole image
            taken |= cells
            rs, cs = [r for r, _ in cells], [c for _, c in cells]
            real = draw(st.integers(3, nv), label="real vertices") if nv else 0
            objects.append(_Object(image, (min(rs), min(cs), max(rs), max(cs)),
                                   draw(st.integers(0, subject.nc - 1), label="class"),
                                   draw(st.floats(0.0, 2 * math.pi), label="phase") if nv else 0.0, real,
                                   draw(st.booleans(), label="clockwise") if nv else False))
    moves, spreads = None, None
    if moved:
        floats = st.tuples(st.floats(0.6, 1.4), st.floats(-6.0, 6.0), st.floats(-6.0, 6.0), st.floats(0.8, 1.25))
        moves = [draw(floats, label="vertex scale, dx, dy (px), box scale") for _ in objects]
        spreads = [draw(st.floats(0.0, 0.8), label="DFL spread") for _ in objects]
    return _scene_of(objects, grid, cell, nv, moves, spreads)


def _drawn_scenes(*, batch_size: int, min_objects: int, max_objects: int, moved: bool,
                  applies=None) -> hs.Input:
    """`_scenes` on the subject's grid. Bound before the search, where `_absolute_setup` skips a subject the
    exact-fit constructions do not apply to (and `applies(subject, setting)` may skip or fail it too)."""
    images = f"{batch_size} image{'s' if batch_size > 1 else ''}"
    describes = (f"scenes ({images} of 2-3 coarsest-stride cells a side, {min_objects}-{max_objects} separated "
                 "objects per image of up to 3 cells a side, classes drawn, polygons convex or padded in either "
                 f"orientation{'; per object a vertex scale and shift, box scale and DFL spread' if moved else ''})")

    def bind(subject):
        setting = _absolute_setup(subject, CheckContext())
        if applies is not None:
            applies(subject, setting)
        return _scenes(subject, setting.cell, batch_size=batch_size, min_objects=min_objects,
                       max_objects=max_objects, max_cells=setting.max_cells, moved=moved)

    return hs.Input(describes, bind)


class _Anchors(NamedTuple):
    """Every anchor of a scene: where it is and which object (if any) it lies in."""

    grid: torch.Tensor  # (A, 2) x, y in grid units, float64
    stride: torch.Tensor  # (A,)
    level: torch.Tensor  # (A,) long
    owner: torch.Tensor  # (B, A) long: the row of the object containing the anchor, -1 for none
    representative: torch.Tensor  # (B, A) bool: per object and level, its anchor nearest the object's centre


def _scene_anchors(scene: _Scene, feats, strides) -> _Anchors:
    grid, stride = anchor_grid(feats, strides)
    level = torch.cat([torch.full((f.shape[-2] * f.shape[-1],), i) for i, f in enumerate(feats)])
    px = grid * stride[:, None]
    owner = torch.full((feats[0].shape[0], grid.shape[0]), -1)
    representative = torch.zeros(owner.shape, dtype=torch.bool)
    for row, (image, box) in enumerate(zip(scene.batch["batch_idx"].long().tolist(), scene.boxes)):
        inside = ((px > box[:2]) & (px < box[2:])).all(1)
        owner[image, inside] = row
        distance = (px - (box[:2] + box[2:]) / 2).pow(2).sum(1)
        for lv in range(len(feats)):
            candidates = (inside & (level == lv)).nonzero().flatten()
            representative[image, candidates[distance[candidates].argmin()]] = True
    return _Anchors(grid, stride, level, owner, representative)


def _distribution_logits(ltrb: torch.Tensor, reg_max: int, spread: torch.Tensor) -> torch.Tensor:
    """(B, 4, A) distances in bins -> (B, 4 * reg_max, A) logits whose softmax expectation is exactly those distances.

    spread 0: the DFL's own two-bin target (1 - f, f) on bins (k, k + 1), k + f the distance, the minimiser of the
    DFL's cross-entropy; spread a in (0, 1]: that target mixed with weight a with (1 - f/2, 0, f/2) on (k, k + 1,
    k + 2), the same mean, a distribution further from the target. reg_max = 1: the distances themselves."""
    if reg_max == 1:
        return ltrb
    b, _, a = ltrb.shape
    low = ltrb.floor().clamp(0, reg_max - 2)
    frac = ltrb - low
    mix = spread[:, None, :].expand_as(ltrb)
    probs = torch.zeros(b, 4, reg_max, a, dtype=torch.float64)
    for offset, weight in ((0, (1 - mix) * (1 - frac) + mix * (1 - frac / 2)), (1, (1 - mix) * frac),
                           (2, mix * frac / 2)):
        probs.scatter_add_(2, (low.long() + offset).clamp(max=reg_max - 1).unsqueeze(2), weight.unsqueeze(2))
    return probs.log().clamp(min=ABSENT_BIN_LOGIT).view(b, 4 * reg_max, a)


class _Outputs(NamedTuple):
    """What the head's outputs tell the constructions: DFL bins, classes, vertices, dtype."""

    reg_max: int
    nc: int
    num_vertices: int
    dtype: torch.dtype


def _constructed_preds(outputs: _Outputs, scene: _Scene, anchors: _Anchors, feats, fitted, confident, *,
                       spread: float | None = None, moved: bool = False, boxes_moved: bool = False) -> dict:
    """Named outputs built from the documented decode. At `fitted` anchors (B, A) the box decodes onto the owner's
    box (scaled about its centre by the scene's box scale when `boxes_moved`) and the vertices onto its polygon (moved
    when `moved`), the DFL as the two-bin target mixed with `spread` (None: the scene's per-object spreads when
    `moved`, else 0); elsewhere the box collapses onto the anchor point and the raw vertices are 0. The class logit
    is POSITIVE_LOGIT for the owner's class at `confident` anchors and BACKGROUND_LOGIT everywhere else."""
    b, a = anchors.owner.shape
    rows = anchors.owner.clamp(min=0)
    box = scene.boxes[rows]  # (B, A, 4) the owner's box
    centre = (box[..., :2] + box[..., 2:]) / 2
    if boxes_moved:
        half = (box[..., 2:] - box[..., :2]) / 2 * scene.moves[rows][..., 3:]
        box = torch.cat((centre - half, centre + half), -1)
    px = anchors.grid * anchors.stride[:, None]
    ltrb = torch.stack((px[:, 0] - box[..., 0], px[:, 1] - box[..., 1], box[..., 2] - px[:, 0],
                        box[..., 3] - px[:, 1]), 1) / anchors.stride  # (B, 4, A) in bins
    # Below reg_max - 2 bins, so the spread's third bin exists (the objects are sized for it: `_absolute_setup`).
    top = outputs.reg_max - 2 - 1e-6 if outputs.reg_max > 1 else math.inf
    ltrb = torch.where(fitted[:, None], ltrb.clamp(0, top), torch.zeros_like(ltrb))
    if spread is None:
        spread_of = scene.spreads[rows] if moved else torch.zeros(b, a, dtype=torch.float64)
    else:
        spread_of = torch.full((b, a), float(spread), dtype=torch.float64)
    spread_of = torch.where(fitted, spread_of, torch.zeros_like(spread_of))
    scores = torch.full((b, outputs.nc, a), BACKGROUND_LOGIT)
    image, anchor = confident.nonzero(as_tuple=True)
    classes = scene.batch["cls"][anchors.owner[image, anchor], 0].long()
    scores[image, classes, anchor] = POSITIVE_LOGIT
    preds = {"boxes": _distribution_logits(ltrb, outputs.reg_max, spread_of).to(outputs.dtype),
             "scores": scores.to(outputs.dtype), "feats": feats}
    if outputs.num_vertices:
        vertices = scene.polygons[rows]  # (B, A, np, 2) pixels
        if moved:
            move = scene.moves[rows]
            vertices = centre[:, :, None] + move[..., None, :1] * (vertices - centre[:, :, None]) + move[..., None, 1:3]
        raw = (vertices / anchors.stride[:, None, None] - anchors.grid[:, None, :] + 0.5) / 2
        raw = torch.where(fitted[..., None, None], raw, torch.zeros_like(raw))
        preds["polygons"] = raw.reshape(b, a, 2 * outputs.num_vertices).transpose(1, 2).to(outputs.dtype)
    return preds


class _Absolute(NamedTuple):
    """One subject's setting for the absolute properties."""

    loss: object
    outputs: _Outputs
    cell: float
    max_cells: int
    halfway: bool  # every fitted DFL target lies halfway between two bins (each stride divides the coarsest)
    head: object
    extras: tuple[str, ...]  # the head's other outputs (keypoints, angles, masks): not constructed


def _absolute_setup(subject, ctx, *, exact: bool = True) -> _Absolute:
    """The loss, the head's output geometry and the largest object (in cells) whose fit the DFL bins can express.

    `exact`: the property needs the fit itself (CheckSkipped where reg_max cannot express a one-cell object)."""
    head = subject.build_head()
    template = train_preds(subject, head, features(subject, batch=1, image_size=(64, 64), seed=ctx.seed))
    reg_max = template["boxes"].shape[1] // 4
    num_vertices = template["polygons"].shape[1] // 2 if "polygons" in template else 0
    outputs = _Outputs(reg_max, template["scores"].shape[1], num_vertices, template["boxes"].dtype)
    extras = tuple(k for k in template if k not in ("boxes", "scores", "feats", "polygons"))
    if exact and extras:
        raise CheckSkipped(
            f"the head also predicts {list(extras)}: the exact-fit constructions build boxes, class logits and "
            "polygons only (rotated boxes, keypoints and masks have decodes of their own, not built yet)"
        )
    strides = [float(s) for s in subject.strides]
    cell, finest = max(strides), min(strides)
    # The farthest fitted distance, (cells * cell - finest / 2) / finest bins, must stay below reg_max - 2, so the
    # spread's third bin above it exists: cells < (reg_max - 1.5) * finest / cell.
    max_cells = 3 if reg_max == 1 else min(3, math.ceil((reg_max - 1.5) * finest / cell) - 1)
    if max_cells < 1:
        if exact:
            raise CheckSkipped(
                f"reg_max={reg_max} bins cannot express a {cell:g} px object at stride {finest:g} (that needs "
                f"reg_max > {cell / finest + 1.5:g}); the exact-fit construction does not apply"
            )
        max_cells = 1
    halfway = all((cell / s).is_integer() for s in strides)
    return _Absolute(subject.build_loss(head), outputs, cell, max_cells, halfway, head, extras)


def _scene_inputs(subject, setting: _Absolute, scene: _Scene):
    """(zero feature maps of the scene's size, its anchors): the losses read only the maps' shapes."""
    feats = [torch.zeros(shape, dtype=setting.outputs.dtype)
             for shape in subject.feature_shapes(scene.image_size, int(scene.batch["batch_idx"].max()) + 1)]
    return feats, _scene_anchors(scene, feats, subject.strides)


def _with_tasks(subject, setting: _Absolute, scene: _Scene, feats, preds: dict, seed: int):
    """(batch, preds) with the head's other tasks: the batch's ordinary task targets for the scene's boxes
    (`task_targets`), the head's own outputs on `feats` for its other outputs. Unchanged for a box/polygon head."""
    if not setting.extras:
        return scene.batch, preds
    batch = hs.from_head(subject).task_targets(scene.batch, batch_size=feats[0].shape[0], seed=seed)
    own = detached_preds(train_preds(subject, setting.head, feats))
    return batch, {**preds, **{k: own[k] for k in setting.extras}}


def _per_level_items(setting: _Absolute, scene: _Scene, feats, anchors: _Anchors, strides, keys) -> str:
    """'stride 8: polygon_loss 0; ...' with only that level's representatives fitted and confident: which level's
    conversion is wrong."""
    parts = []
    for lv, stride in enumerate(strides):
        only = anchors.representative & (anchors.level == lv)[None]
        preds = _constructed_preds(setting.outputs, scene, anchors, feats, only, only)
        _, items = _loss(setting.loss, preds, scene.batch, "the loss at an exact fit on one level")
        parts.append(f"stride {float(stride):g}: " + ", ".join(f"{k} {items[k]:.4g}" for k in keys if k in items))
    return "; ".join(parts)


def _spread_cross_entropy(spread: float) -> float:
    """The DFL's cross-entropy per side of the spread (1/2 + a/4, 1/2 - a/2, a/4) against the halfway target (1/2,
    1/2)."""
    return -(math.log(0.5 + spread / 4) + math.log(0.5 - spread / 2)) / 2


@check(area="loss", inputs={
    "scene": _drawn_scenes(batch_size=2, min_objects=1, max_objects=2, moved=False),
    "spread": hs.drawn(st.floats(0.1, 0.8), "DFL spreads 0.1-0.8 (the distribution compared with the fit)")})
def check_loss_minimum_at_exact_fit(subject, ctx, scene, spread):
    """Predictions that decode exactly onto the targets give each term its minimum: box (1 - CIoU) and polygon 0, DFL
    its floor, the entropy of the two-bin target (ln 2 per side: every box edge lies on the coarsest grid, so each
    target distance is halfway between two bins).

    Every anchor inside each object predicts the object's box and polygon exactly (documented decode), each object's
    nearest-to-centre anchor on each level has a confident class logit, so a task-aligned assigner picks positives
    on every level. Minimum: 0 within ZERO_ATOL where the answer is 0 (box, polygon); the DFL's gain and normaliser
    are the loss's own, so its floor is checked as a ratio: the DFL at the fit over the DFL at a distribution with
    the same expectation (same decoded boxes, same assignment) but further from the target equals ln 2 over that
    distribution's cross-entropy (and is below 1)."""
    setting = _absolute_setup(subject, ctx)
    feats, anchors = _scene_inputs(subject, setting, scene)
    inside = anchors.owner >= 0
    preds = _constructed_preds(setting.outputs, scene, anchors, feats, inside, anchors.representative)
    _, items = _loss(setting.loss, preds, scene.batch, "the loss at an exact fit")
    terms = [k for k in PER_OBJECT_ITEMS if k in items]
    if not terms:
        raise CheckSkipped(f"the loss reports none of the items {PER_OBJECT_ITEMS} (items: {sorted(items)})")
    wrong = {k: items[k] for k in ("box_loss", "polygon_loss") if k in items and not abs(items[k]) <= ZERO_ATOL}
    if wrong:
        levels = _per_level_items(setting, scene, feats, anchors, subject.strides, list(wrong))
        raise CheckFailure(
            f"at predictions that decode exactly onto the targets, {_format_items(wrong)}; expected 0 (a box or "
            f"polygon compared with itself). Per level, with only that level's anchor of each object fitted: "
            f"{levels}. A term wrong the same way every time: convert each positive's targets with its OWN "
            "level's stride, and add no constant to the term"
        )
    if "dfl_loss" in items and setting.outputs.reg_max > 1 and setting.halfway:
        probe = _constructed_preds(setting.outputs, scene, anchors, feats, inside, anchors.representative,
                                   spread=spread)
        _, spread_items = _loss(setting.loss, probe, scene.batch, "the loss at a spread fit")
        floor, further = math.log(2), _spread_cross_entropy(spread)
        at_fit, at_spread = items["dfl_loss"], spread_items["dfl_loss"]
        ratio = at_fit / at_spread if at_spread > 0 else math.nan
        if not math.isclose(ratio, floor / further, rel_tol=FLOOR_RTOL):
            raise CheckFailure(
                f"the DFL term is not at its floor at an exact fit: dfl_loss = {at_fit:.6g} at the two-bin "
                f"target distribution, {at_spread:.6g} at a distribution with the same expectation (same boxes, "
                f"same positives) but spread by {spread:.3g}; their ratio is {ratio:.6g}, expected ln 2 / "
                f"{further:.6g} = {floor / further:.6g}: the floor is the entropy of the two-bin target (ln 2 "
                "per side here, every target halfway between two bins), so the DFL must be the cross-entropy "
                "against that target, times a gain, over the same normaliser (targets in the positive's own "
                "stride units, bins left/right of the target distance)"
            )


def _format_items(items) -> str:
    return ", ".join(f"{k} = {v:.6g}" for k, v in items.items())


@check(area="loss", inputs={"scene": _drawn_scenes(batch_size=1, min_objects=2, max_objects=3, moved=True)})
def check_loss_per_object_decomposition(subject, ctx, scene):
    """Each per-object term (box, polygon, DFL) of an image equals the combination of its objects' terms alone.

    The reduction (ours and Ultralytics'): T = gain * sum_k w_k l_k / max(1, sum_k w_k) over positives k, w_k the
    anchor's summed target score. With separated objects each object's positives and weights are the same alone as
    together, so with S_i = the sum of object i's weights (>= 1): T = sum_i S_i T_i / sum_i S_i. Here each object has
    exactly one fitted, confident anchor per level (alignment 1, target score 1) and its other anchors predict
    collapsed boxes with background logits (alignment 0, weight 0), so S_i = the number of levels for every object
    and T = the plain mean of the T_i. Vertices and DFL distributions are moved away from the fit by a different
    amount per object (the boxes stay exact: a box scale would change the weights)."""
    n = scene.boxes.shape[0]
    assume(n >= 2)
    setting = _absolute_setup(subject, ctx)
    feats, anchors = _scene_inputs(subject, setting, scene)
    reps = anchors.representative
    preds = _constructed_preds(setting.outputs, scene, anchors, feats, reps, reps, moved=True)
    _, together = _loss(setting.loss, preds, scene.batch, "the loss on the image")
    alone = [_loss(setting.loss, preds, scene.alone(i), f"the loss on object {i} alone")[1] for i in range(n)]
    keys = [k for k in PER_OBJECT_ITEMS if k in together]
    mean = {k: sum(a[k] for a in alone) / n for k in keys}
    bad = items_close({k: together[k] for k in keys}, mean, rtol=RTOL, atol=ATOL)
    if bad:
        each = "; ".join(f"object {i}: {_format_items({k: a[k] for k in keys})}" for i, a in enumerate(alone))
        raise CheckFailure(
            f"per-object terms of an image differ from the mean of its {n} objects' terms alone: "
            f"{'; '.join(bad)} (together vs mean; {each}). The objects are separated and equally weighted (one "
            "fitted anchor per level each), so each object's term must depend on that object alone: normalise "
            "by the object's OWN box area, gather its OWN target (never a value broadcast across an image's "
            "instances)"
        )


def _declared_family(subject, loss) -> str | None:
    """The loss family the subject declares (`HeadSpec(loss_family=...)`, the reference loss's own), else the
    criterion's `loss_family` attribute; Ultralytics' v8DetectionLoss (`headguard.adapters.ultralytics.detection_loss`)
    is of "detection"."""
    declared = subject.loss_family or getattr(loss, "loss_family", None)
    if declared is None and subject.loss_factory is ultralytics_detection_loss:
        return "detection"
    return declared


def _family_of(subject, setting: _Absolute) -> str:
    """The subject's declared loss family; CheckSkipped where it declares none, CheckFailure for an unknown one."""
    family = _declared_family(subject, setting.loss)
    if family is None:
        raise CheckSkipped(
            "the subject declares no loss family (HeadSpec(loss_family=...), one of "
            f"{sorted(LOSS_FAMILIES)}), so there is no reference loss to compare with"
        )
    if family not in LOSS_FAMILIES:
        raise CheckFailure(f"the subject declares loss_family={family!r}; expected one of {sorted(LOSS_FAMILIES)}")
    return family


@check(area="loss", inputs={"scene": _drawn_scenes(batch_size=2, min_objects=1, max_objects=3, moved=True,
                                                   applies=_family_of)})
def check_loss_matches_reference_family(subject, ctx, scene):
    """A loss that declares a family (`loss_family`: "detection", "polygon", "polygon-mgiou") gives the items of that
    family's reference loss on the same inputs: separated objects, one fitted confident anchor per level each, boxes
    scaled, vertices moved and DFL distributions spread by a different amount per object (every term non-zero).

    A subject that declares no family is skipped, and one that declares an unknown family fails, before the
    search."""
    setting = _absolute_setup(subject, ctx)
    family = _family_of(subject, setting)
    reference = LOSS_FAMILIES[family](setting.head)  # the family's loss reads the head's geometry only
    feats, anchors = _scene_inputs(subject, setting, scene)
    reps = anchors.representative
    preds = _constructed_preds(setting.outputs, scene, anchors, feats, reps, reps, moved=True, boxes_moved=True)
    _, theirs = _loss(setting.loss, preds, scene.batch)
    _, ours = _loss(reference, preds, scene.batch, f"the reference {family!r} loss")
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise CheckFailure(f"the loss lacks the items {missing} of its declared family {family!r}")
    bad = items_close({k: theirs[k] for k in ours}, ours, rtol=RTOL, atol=ATOL)
    if bad:
        raise CheckFailure(
            f"the loss declares loss_family={family!r} but its items differ from that family's reference loss "
            f"on the same inputs: {'; '.join(bad)} (this loss vs the reference); a term wrong by a constant, a "
            "gain or a normaliser, or a different assignment"
        )
