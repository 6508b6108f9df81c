"""Forward pass and decode: finite outputs for extreme inputs, one decode for training and inference (R9),
deterministic inference, inputs left untouched."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from headguard import strategies as hs
from headguard.checks._common import (
    IMAGE_SIZE,
    all_finite,
    anchor_grid,
    branch_by_out_channels,
    call,
    check,
    count_nonfinite,
    eval_outputs,
    features,
    final_convs,
    run_property,
    where_nonfinite,
)
from headguard.registry import CheckFailure


# Swept deterministically before the random search, so the extremes are always tried within the ci budget.
EXTREME_SWEEP = tuple((m, fill) for m in (0.0, 1e-30, 1e4) for fill in ("normal", "constant"))


@check(area="forward")
def check_finite_outputs_extreme_inputs(subject, ctx):
    """Finite train and eval outputs for extreme feature maps (0, 1e-30 ... 1e4, constant, odd sizes, layouts)."""
    bound = hs.from_head(subject)

    def inner(feats):
        for mode in ("train", "eval"):
            # A fresh copy per mode: a train forward would move BatchNorm statistics towards this very input.
            head = subject.build_head().train(mode == "train")
            with torch.no_grad():
                out = call(f"the head's {mode} forward", head, list(feats))
            if not all_finite(out):
                fresh = subject.build_head().train(mode == "train")
                where = where_nonfinite(fresh, lambda m: m(list(feats)), backward=False)
                raise CheckFailure(
                    f"the {mode}-mode output is non-finite for feature maps of magnitude {feats.recipe.magnitude:g} "
                    f"({feats.recipe.fill}, {feats.recipe.layout}){where}; every output must stay finite for inputs up "
                    "to 1e4: look for an unguarded exp/log/division in the head or its decode (softmax without "
                    "subtracting the max, exp of a raw output)"
                )

    side = _min_side(subject)
    for i, (magnitude, fill) in enumerate(EXTREME_SWEEP):
        recipe = hs._MapRecipe(batch=2, image_size=(side, side + 2), magnitude=magnitude, fill=fill,
                               layout="contiguous", seed=ctx.seed + i)
        try:
            inner(hs.make_feature_maps(subject.channels, subject.strides, recipe))
        except CheckFailure as failure:
            raise CheckFailure(failure.message, example=f"Falsifying example: {recipe!r}") from None
    run_property(ctx, inner, bound.feature_maps(max_batch=3, image_sizes=hs.image_sizes(min_size=side, max_size=80)))


# The size heads are trained and validated at, and a larger one that is not a multiple of it (nor of 64).
REALISTIC_IMAGE_SIZES = ((640, 640), (672, 704))


@check(area="forward")
def check_realistic_image_sizes(subject, ctx):
    """Eval at realistic image sizes (640 px, and 672 x 704) works: finite y with one column per anchor.

    The other checks use images of 64-96 px so that they run in milliseconds; a head whose grids or anchors were
    precomputed for 640 px passes all of them and crashes at 672. Drawing cannot find more here: the sizes are the
    property, so this probe is one eval forward per size, batch 1."""
    head = subject.build_head()
    for height, width in REALISTIC_IMAGE_SIZES:
        feats = features(subject, batch=1, image_size=(height, width), seed=ctx.seed)
        y, _ = eval_outputs(subject, head, feats, what=f"the head's eval forward on a {height}x{width} px image")
        anchors = sum(f.shape[-2] * f.shape[-1] for f in feats)
        if y.shape[-1] != anchors:
            raise CheckFailure(
                f"on a {height}x{width} px image eval y has {y.shape[-1]} anchor columns; expected {anchors}, one per "
                "cell of every level: anchors or grids must be made from the feature maps of each call, not cached"
            )
        if not all_finite(y):
            raise CheckFailure(f"on a {height}x{width} px image eval y has {count_nonfinite(y)}")


def _min_side(subject) -> int:
    """Smallest image side giving >= 2 cells at the coarsest level: train-mode BatchNorm needs > 1 value per channel."""
    return int(max(subject.strides)) + 1


def _reference_decode(subject, head, preds, feats) -> tuple[torch.Tensor, list[int]]:
    """(the documented decode in float64, the rows of eval y it gives) from the raw training outputs: DFL
    expectation -> ltrb distances -> xywh pixels; sigmoid scores; vertices (2 * raw + anchor - 0.5) * stride.
    Rows with no documented decode here are left out: rotated boxes (their xywh depend on the angle), keypoints,
    angles and mask coefficients."""
    points, strides = anchor_grid(feats, subject.strides)
    anchor, stride = points.T.unsqueeze(0), strides.view(1, 1, -1)  # (1, 2, A), (1, 1, A)
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


@check(area="forward")
def check_decode_consistency(subject, ctx):
    """Inference decode equals the training decode of the same raw outputs and stays finite in each dtype (R9).

    The training decode is the documented one (DFL expectation -> ltrb -> xywh pixels; vertices (2 * raw + anchor -
    0.5) * stride), with nothing clamped; compute dtypes: fp32, bf16 autocast, fp16 weights, and the inference output
    must be finite wherever the raw outputs are.

    Raw outputs are driven large by setting the final biases of the box and vertex branches to +-R (R up to 2e3:
    at stride 32 a vertex of raw 1e3 is 64,000 px, the edge of fp16)."""
    feats = features(subject, batch=1, image_size=IMAGE_SIZE, seed=ctx.seed)

    def inner(raw_bias, precision):
        head = subject.build_head()
        finals = final_convs(head, feats)
        vertex_branches = branch_by_out_channels(finals, 2 * subject.num_vertices) if subject.num_vertices else []
        with torch.no_grad():
            for bname, _lvl, _name, conv in finals:
                if bname in vertex_branches and conv.bias is not None:
                    signs = torch.tensor([1.0, -1.0]).repeat(conv.out_channels // 2 + 1)[: conv.out_channels]
                    conv.bias.copy_(signs * raw_bias)
        x = list(feats)
        if precision == "float16":
            head = head.half()
            x = [f.half() for f in x]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16-autocast"):
            y, preds = eval_outputs(subject, head, x, what=f"the head's eval forward ({precision})")
        raw_finite = all(bool(torch.isfinite(v).all()) for k, v in preds.items() if isinstance(v, torch.Tensor))
        if raw_finite and not all_finite(y):
            raise CheckFailure(
                f"the inference decode overflows in {precision}: y has {count_nonfinite(y)} while the raw outputs are"
                f" finite (final vertex bias {raw_bias:g}); decode in float32 (upcast the raw outputs) instead of "
                "clamping them"
            )
        if not raw_finite:
            return
        expected, rows = _reference_decode(subject, head, preds, feats)
        got = y.double()[:, rows]
        # fp32: agreement to float rounding. bf16/fp16 keep 8/11 mantissa bits, so allow 2^-5 relative and 1 px;
        # a clamp (R9: raw clamped to +-50 at inference only) is off by whole strides.
        rtol, atol = (1e-5, 1e-3) if precision == "float32" else (2.0**-5, 1.0)
        bad = (got - expected).abs() > atol + rtol * expected.abs()
        if bool(bad.any()):
            row = rows[int(bad.nonzero()[0, 1])]
            where = "boxes" if row < 4 else "scores" if row < 4 + subject.nc else "vertices"
            raise CheckFailure(
                f"the inference decode disagrees with the training decode of the same raw outputs in y row {row} "
                f"({where}): max |difference| {float((got - expected).abs().max()):.4g} ({precision}, final "
                f"vertex bias {raw_bias:g}); inference must decode exactly as the loss does, with nothing clamped"
            )

    precisions = st.sampled_from(("float32", "bfloat16-autocast", "float16"))
    run_property(ctx, inner, st.sampled_from((0.0, 10.0, 60.0, 300.0, 1000.0, 2000.0)), precisions, max_examples=12)


@check(area="forward")
def check_inference_deterministic(subject, ctx):
    """Same eval input twice gives the same output, also after an input of another size (no stale caches)."""
    head = subject.build_head()
    first = features(subject, batch=2, image_size=IMAGE_SIZE, seed=ctx.seed)
    other = features(subject, batch=1, image_size=(96, 48), seed=ctx.seed + 1)
    y1, _ = eval_outputs(subject, head, first)
    y2, _ = eval_outputs(subject, head, first)
    eval_outputs(subject, head, other)
    y3, _ = eval_outputs(subject, head, first)
    for label, y in (("a repeated call", y2), ("a call after an input of another size", y3)):
        if y.shape != y1.shape or not torch.equal(y, y1):
            diff = float((y - y1).abs().max()) if y.shape == y1.shape else "shape " + str(tuple(y.shape))
            raise CheckFailure(
                f"eval output changed on {label} with the same input (max |difference| {diff}); inference must be a "
                "pure function of its input: rebuild cached anchors/strides whenever the input shape changes"
            )


@check(area="forward")
def check_forward_does_not_mutate_inputs(subject, ctx):
    """The caller's feature maps (the list and every tensor in it) are unchanged by train and eval forwards."""
    head = subject.build_head()
    feats = features(subject, batch=2, seed=ctx.seed)
    saved = [f.clone() for f in feats]
    ids = [id(f) for f in feats]
    for mode in ("train", "eval"):
        getattr(head, mode)()
        with torch.no_grad():
            call(f"the head's {mode} forward", head, feats)
        if [id(f) for f in feats] != ids or len(feats) != len(saved):
            raise CheckFailure(
                f"the {mode} forward replaced items of the caller's feature-map list (x[i] = ...); build a new list "
                "instead of writing into the caller's"
            )
        for i, (f, s) in enumerate(zip(feats, saved)):
            if f.shape != s.shape or not torch.equal(f, s):
                raise CheckFailure(
                    f"the {mode} forward changed the caller's feature map x[{i}] in place; use out-of-place ops "
                    "(no inplace=True activation or `+=` on the inputs)"
                )
