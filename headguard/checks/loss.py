"""Loss properties: rejecting non-finite predictions (R8), background-only batches (R10), batch replication (R4)
and decomposition (R5), target order, degenerate targets (R6), dtypes, purity, finite gradients (R7), assigner
coverage (R11); for polygon heads, detection terms equal to the detection loss's (R3) and a usable vertex gradient at
init (R2)."""

from __future__ import annotations

import math

import torch
from hypothesis import assume
from hypothesis import strategies as st

import losses

from headguard import strategies as hs
from headguard.checks._common import (
    all_finite,
    call,
    check,
    count_nonfinite,
    first_bad_gradient,
    missing_gradient,
    detached_preds,
    features,
    fit_boxes_to_first_object,
    items_close,
    ordinary_targets,
    run_property,
    select_images,
    train_preds,
)
from headguard.registry import CheckFailure, CheckSkipped

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


@check(area="loss")
def check_loss_rejects_nonfinite(subject, ctx):
    """A NaN/Inf prediction makes the loss raise a clear error; never a quiet finite scalar (R8)."""
    _, loss, preds = _setup(subject, ctx)
    batch = ordinary_targets(subject, 2, seed=ctx.seed)
    keys = _pred_keys(preds)

    def inner(key, value, where):
        bad = detached_preds(preds)
        flat = bad[key].view(-1)
        flat[int(where * (flat.numel() - 1))] = value
        try:
            vector, _ = loss(bad, batch)
        except Exception as err:  # noqa: BLE001  (any raised error is the wanted outcome, if it says something)
            if not str(err).strip():
                raise CheckFailure(
                    f"the loss raised {type(err).__name__} with no message for preds[{key!r}] = {value}"
                ) from err
            return
        quiet = "a finite" if all_finite(vector) else "a non-finite"
        raise CheckFailure(
            f"the loss returned {quiet} value ({vector.detach().tolist()}) for preds[{key!r}] holding {value}; a "
            "non-finite prediction must raise an error naming the tensor (never replace it by a constant, never "
            "return a number that an optimizer will step on)"
        )

    run_property(ctx, inner, st.sampled_from(keys), st.sampled_from((math.nan, math.inf, -math.inf)),
                 st.floats(0.0, 1.0))


@check(area="loss")
def check_loss_all_background(subject, ctx):
    """An empty batch gives a finite loss with box, DFL (and polygon) terms exactly 0 (R10)."""
    _, loss, preds = _setup(subject, ctx)
    preds = detached_preds(preds, requires_grad=True)
    empty = ordinary_targets(subject, 2, per_image=0, seed=ctx.seed)
    vector, items = _loss(loss, preds, empty, "the loss on an all-background batch")
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


def _replicate(preds, batch, k):
    out = {}
    for key, v in preds.items():
        out[key] = [f.repeat(k, 1, 1, 1) for f in v] if key == "feats" else v.repeat(k, *([1] * (v.ndim - 1)))
    n = batch["batch_idx"].shape[0]
    rep = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in batch.items() if key != "batch_idx"}
    rep["batch_idx"] = torch.arange(k).repeat_interleave(n).float()
    return out, rep


@check(area="loss")
def check_loss_batch_replication(subject, ctx):
    """Loss items are unchanged when one image (predictions and objects) is replicated k times (R4)."""
    _, loss, raw_preds = _setup(subject, ctx, batch=1)
    bound = hs.from_head(subject)

    def inner(batch, k):
        # Boxes fitted to the first object keep the sum of target scores >= 1, so max(1, .) does not clamp; that
        # needs anchors inside it (>= 16 px at stride 8 in a 64 px image).
        assume(float(batch["bboxes"][0, 2:4].min()) >= 0.25)  # w, h (a rotated box's angle is no size)
        preds = fit_boxes_to_first_object(raw_preds, batch, subject.strides)
        _, one = _loss(loss, preds, batch)
        many_preds, many_batch = _replicate(preds, batch, k)
        _, many = _loss(loss, many_preds, many_batch)
        bad = items_close(one, many, rtol=RTOL, atol=ATOL)
        if bad:
            raise CheckFailure(
                f"loss items change when one image is replicated {k} times: {'; '.join(bad)} (1 image vs {k} copies); "
                "every term must be a mean over images/positives, not a sum that grows with the batch size"
            )

    run_property(ctx, inner, bound.targets(batch_size=1, min_objects=1, max_objects=4, box_kinds=("normal",),
                                           polygon_kinds=("convex",)), st.integers(2, 4))


def _take_images(preds, images):
    idx = torch.tensor(images)
    return {k: ([f[idx] for f in v] if k == "feats" else v[idx]) for k, v in preds.items()}


@check(area="loss")
def check_loss_batch_decomposition(subject, ctx):
    """Image order does not matter: items of [A, B] equal those of [B, A] (R5).

    Terms a loss declares per-image averaged (attribute `per_image_terms`) must also equal the mean of [A] alone and
    [B] alone. The reference normalises every term by the batch's sum of target scores, so only the swap applies."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    bound = hs.from_head(subject)
    per_image = tuple(getattr(loss, "per_image_terms", ()))

    def inner(batch):
        assume(bool((batch["batch_idx"] == 0).any()) and bool((batch["batch_idx"] == 1).any()))
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

    run_property(ctx, inner, bound.targets(batch_size=2, min_objects=2, max_objects=5, box_kinds=("normal",),
                                           polygon_kinds=("convex",)))


@check(area="loss")
def check_loss_target_order_invariant(subject, ctx):
    """Permuting the objects of each image (rows of every target tensor together) changes no loss item."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    bound = hs.from_head(subject)

    def inner(batch, data):
        n = batch["batch_idx"].shape[0]
        perm = torch.tensor(data.draw(st.permutations(range(n)), label="permutation"), dtype=torch.long)
        # Keep rows grouped by image (the Ultralytics batch convention); shuffle within each image.
        perm = perm[batch["batch_idx"][perm].argsort(stable=True)]
        _, before = _loss(loss, preds, batch)
        _, after = _loss(loss, preds, hs.reorder_objects(batch, perm))
        bad = items_close(before, after, rtol=RTOL, atol=ATOL)
        if bad:
            raise CheckFailure(
                f"reordering the objects within an image changes loss items: {'; '.join(bad)}"
                f" (permutation {perm.tolist()});"
                " the loss must not depend on object order (stable per-image grouping, no order-dependent ties)"
            )

    # Identical boxes of different classes are a true tie (which class an anchor learns is then order-dependent by
    # any rule), so the boxes here are continuous draws, never exact copies.
    run_property(ctx, inner, bound.targets(batch_size=2, min_objects=2, max_objects=6, box_kinds=("normal", "tiny"),
                                           polygon_kinds=("convex", "padded")), st.data())


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


@check(area="loss")
def check_loss_finite_degenerate_targets(subject, ctx):
    """Finite loss and gradients on degenerate targets, for float32 and bfloat16 predictions (R6).

    Families: zero-width/height, tiny, image-covering, edge-touching and duplicate boxes; all-equal, collinear,
    repeated-vertex and padded polygons."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    bound = hs.from_head(subject)

    def inner(batch, dtype):
        vector, _, grads = _grad_run(loss, preds, batch, dtype)
        if not all_finite(vector):
            raise CheckFailure(
                f"the loss is non-finite ({vector.detach().tolist()}) on degenerate targets in {dtype}: guard every "
                "division (select with a mask BEFORE dividing) and use an epsilon representable in the compute dtype"
            )
        unused = missing_gradient(grads, situation=f"on degenerate targets in {dtype}")
        if unused is not None:
            raise unused
        k = first_bad_gradient(grads)
        if k is not None:
            raise CheckFailure(
                f"the gradient w.r.t. preds[{k!r}] is non-finite ({count_nonfinite(grads[k])})"
                f" on degenerate targets in {dtype} although the loss is finite: a division or sqrt at 0 in the "
                "backward pass; mask before dividing"
            )

    targets = bound.targets(batch_size=2, min_objects=1, max_objects=5, box_kinds=DEGENERATE_BOXES,
                            polygon_kinds=DEGENERATE_POLYGONS)
    run_property(ctx, inner, targets, st.sampled_from((torch.float32, torch.bfloat16)))


def _clear(err: Exception) -> bool:
    """A clear rejection: a ValueError/TypeError whose message names a dtype or a tensor of the call."""
    text = str(err)
    return isinstance(err, (ValueError, TypeError)) and ("dtype" in text or "preds" in text or "batch" in text)


@check(area="loss")
def check_loss_dtype_matrix(subject, ctx):
    """Every prediction dtype x target dtype either works (finite loss and gradients) or raises a clear error."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    base = ordinary_targets(subject, 2, seed=ctx.seed)
    failures = []
    for pred_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for target_dtype in (torch.float32, torch.float64, torch.float16, torch.int64):
            batch = {k: (v.to(target_dtype) if k in ("batch_idx", "cls") or target_dtype.is_floating_point else v)
                     for k, v in base.items() if v.dtype != torch.bool}
            batch.update({k: v for k, v in base.items() if v.dtype == torch.bool})
            try:
                vector, _, grads = _grad_run(loss, preds, batch, pred_dtype)
            except CheckFailure as failure:
                err = failure.__cause__
                if err is not None and _clear(err):
                    continue
                failures.append(f"preds {pred_dtype} x targets {target_dtype}: unclear error {failure.message}")
                continue
            if not all_finite(vector):
                found = vector.detach().tolist()
                failures.append(f"preds {pred_dtype} x targets {target_dtype}: non-finite loss {found}")
            elif not all(g is not None and all_finite(g) for g in grads.values()):
                failures.append(f"preds {pred_dtype} x targets {target_dtype}: finite loss, non-finite gradients")
    if failures:
        raise CheckFailure(
            f"{len(failures)} dtype combinations neither work nor raise a clear error: " + "; ".join(failures[:4])
            + ". Compute in a dtype where every epsilon is representable (float32 at least), or reject the dtype up "
            "front with a ValueError naming the tensor and its dtype"
        )


@check(area="loss")
def check_loss_pure(subject, ctx):
    """Same inputs twice, same outputs; inputs unchanged; no hidden state carried from one call to the next."""
    _, loss, preds = _setup(subject, ctx, batch=2)
    batch = ordinary_targets(subject, 2, seed=ctx.seed)
    other_preds = _setup(subject, ctx, batch=1, image_size=(96, 64), seed_offset=1)[2]
    other = ordinary_targets(subject, 1, per_image=3, seed=ctx.seed + 1)
    saved_preds, saved_batch = detached_preds(preds), {k: v.clone() for k, v in batch.items()}
    v1, i1 = _loss(loss, preds, batch)
    v2, i2 = _loss(loss, preds, batch)
    _loss(loss, other_preds, other)
    v3, i3 = _loss(loss, preds, batch)
    for label, v, i in (("a repeated call", v2, i2), ("a call after other inputs", v3, i3)):
        if not torch.equal(v1, v) or i1 != i:
            raise CheckFailure(
                f"the loss gave a different result on {label} with identical inputs ({v1.tolist()} vs {v.tolist()}); "
                "a loss must hold no state between calls (no cached anchors, running normalisers or counters)"
            )
    for k in _pred_keys(preds):
        if not torch.equal(preds[k], saved_preds[k]):
            raise CheckFailure(f"the loss modified preds[{k!r}] in place; it must not write into its inputs")
    for k, v in batch.items():
        if not torch.equal(v, saved_batch[k]):
            raise CheckFailure(f"the loss modified batch[{k!r}] in place; it must not write into its inputs")


@check(area="loss")
def check_gradients_finite_when_loss_finite(subject, ctx):
    """Whenever the loss is finite, every gradient is finite (R7: NaN cleaned after a division leaves 0 * inf)."""
    bound = hs.from_head(subject)
    head = subject.build_head()
    loss = subject.build_loss(head)

    def inner(feats, init, data):
        h = init(subject.build_head())
        preds = detached_preds(train_preds(subject, h, feats))
        assume(all_finite({k: preds[k] for k in _pred_keys(preds)}))
        batch = data.draw(bound.targets(batch_size=feats[0].shape[0], max_objects=5), label="batch")
        vector, _, grads = _grad_run(loss, preds, batch, torch.float32)
        if not all_finite(vector):
            return
        unused = missing_gradient(grads, situation="on this batch")
        if unused is not None:
            raise unused
        k = first_bad_gradient(grads)
        if k is not None:
            raise CheckFailure(
                f"the loss is finite ({vector.detach().tolist()}) but its gradient w.r.t. preds[{k!r}] is not "
                f"({count_nonfinite(grads[k])}): a value was cleaned (where/nan_to_num) after a "
                "division whose backward still yields 0 * inf; select with a mask before dividing"
            )

    maps = bound.feature_maps(min_batch=1, max_batch=2, magnitudes=st.sampled_from((0.0, 1.0, 1e2)))
    run_property(ctx, inner, maps, bound.initialisations(), st.data())


@check(area="loss")
def check_assigner_coverage(subject, ctx):
    """For any predictions, every object with anchors inside gets >= 1 positive with non-zero weight (R11).

    Observed from outside: with ONE object in ONE image, a positive with non-zero weight exists iff the box term is
    non-zero (1 - IoU > 0 for any real prediction). Predictions are made wild: class logits far negative and boxes
    collapsed to a point or blown to the maximum distance, so every alignment metric is (close to) 0.
    """
    _, loss, preds = _setup(subject, ctx, batch=1, image_size=(64, 64))
    reg_max = preds["boxes"].shape[1] // 4
    bound = hs.from_head(subject)

    def inner(cx, cy, side, score_logit, box_mode):
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
        _, items = _loss(loss, wild, bound.task_targets(batch, batch_size=1))
        if not items["box_loss"] > 0:
            raise CheckFailure(
                f"an object ({cx:.3g}, {cy:.3g}, side {side:.3g}, normalised) with anchors inside it got no positive "
                f"with non-zero weight (box_loss = {items['box_loss']}) under wild predictions (class logit "
                f"{score_logit:g}, boxes {box_mode}): the assigner starved it and the loss hides the miss; guarantee "
                "each such object at least one positive (e.g. its best-centred anchor) with a non-zero target score"
            )

    # Objects of side >= 0.3 of a 64 px image span >= 19 px, so anchors of the stride-8 level lie inside.
    run_property(ctx, inner, st.floats(0.25, 0.75), st.floats(0.25, 0.75), st.floats(0.3, 0.5),
                 st.sampled_from((0.0, -20.0, -100.0)), st.sampled_from(("as_is", "collapsed", "maximal")))



def _detection_loss(head):
    """The reference detection loss for this head: the oracle for the polygon loss's detection terms."""
    return losses.DetectionLoss.for_head(head)


@check(area="loss", requires=("polygons",))
def check_polygon_detection_terms_match(subject, ctx):
    """The box/cls/dfl items of the polygon loss equal the detection loss's on the same inputs (R3)."""
    head = subject.build_head()
    feats = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    preds = detached_preds(train_preds(subject, head, feats))
    shape_loss, detection_loss = subject.build_loss(head), _detection_loss(head)
    bound = hs.from_head(subject)

    def inner(batch):
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

    run_property(ctx, inner, bound.targets(batch_size=2, min_objects=0, max_objects=5))


@check(area="loss", requires=("polygons",))
def check_polygon_gradient_at_init(subject, ctx):
    """The polygon loss's gradient w.r.t. the head's initial vertex output is finite and non-zero (R2)."""
    head = subject.build_head()
    feats = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    preds = detached_preds(train_preds(subject, head, feats))
    preds["polygons"].requires_grad_(True)
    batch = ordinary_targets(subject, 2, per_image=2, seed=ctx.seed)
    vector, items = call("the polygon loss", subject.build_loss(head), preds, batch)
    if "polygon_loss" not in items:
        raise CheckSkipped(f"the loss reports no 'polygon_loss' item (items: {sorted(items)})")
    vector.sum().backward()
    grad = preds["polygons"].grad
    if grad is None or not bool(torch.isfinite(grad).all()):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is unusable ({count_nonfinite(grad)})"
            f" (polygon_loss = {float(items['polygon_loss']):.4g}): initial polygons are probably degenerate (all "
            "vertices at one point, a 0/0 in the loss); initialise the vertex branch so polygons have spread"
        )
    if not bool(grad.abs().sum() > 0):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is exactly zero (polygon_loss = "
            f"{float(items['polygon_loss']):.4g}): the initial polygons sit at a stationary point (e.g. every "
            "vertex on one point after zeroing the vertex branch's final weights); they will never start to learn"
        )


