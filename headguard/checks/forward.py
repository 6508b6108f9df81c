"""Forward pass and decode: finite outputs for extreme inputs, one decode for training and inference (R9),
deterministic inference, inputs left untouched."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from headguard import strategies as hs
from headguard.testing import (
    IMAGE_SIZE,
    all_finite,
    branch_by_out_channels,
    call,
    check,
    variants,
    count_nonfinite,
    documented_decode,
    eval_outputs,
    features,
    final_convs,
    where_nonfinite,
)
from headguard.registry import CheckFailure


# Tried before the random search, so the extremes are always reached within the ci budget.
EXTREMES = tuple(
    {"feats": hs.MapRecipe(batch=2, image_size=(33, 35), magnitude=m, fill=fill, layout="contiguous", seed=0),
     "init": hs.SHIPPED}
    for m in (0.0, 1e-30, 1e4) for fill in ("normal", "constant")
)


@check(area="forward", inputs={"feats": hs.drawn_feature_maps(max_size=80), "init": hs.drawn_initialisations()},
       examples=EXTREMES, variants=variants(mode=("train", "eval")))
def check_finite_outputs_extreme_inputs(subject, ctx, feats, init, mode):
    """Finite train and eval outputs for extreme feature maps (0, 1e-30 ... 1e4, constant, odd sizes, layouts) and
    initialisations (weights scaled 1e-3 ... 1e2, perturbed)."""
    # A fresh head per example: a train forward moves BatchNorm statistics towards the very input it sees.
    head = init(subject.build_head()).train(mode == "train")
    with torch.no_grad():
        out = call(f"the head's {mode} forward", head, list(feats))
    if not all_finite(out):
        where = where_nonfinite(init(subject.build_head()).train(mode == "train"), lambda m: m(list(feats)),
                                backward=False)
        raise CheckFailure(
            f"the {mode}-mode output is non-finite for feature maps of magnitude {feats.recipe.magnitude:g} "
            f"({feats.recipe.fill}, {feats.recipe.layout}, {init!r}){where}; every output must stay finite for inputs "
            "up to 1e4: look for an unguarded exp/log/division in the head or its decode (softmax without "
            "subtracting the max, exp of a raw output)"
        )


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


RAW_BIASES = (0.0, 10.0, 60.0, 300.0, 1000.0, 2000.0)
# The biases that reach fp16's edge, always tried, on one ordinary input: what the random search may miss in 6 draws.
DECODE_EXAMPLES = tuple(
    {"feats": hs.MapRecipe(batch=1, image_size=IMAGE_SIZE, magnitude=1.0, fill="normal", layout="contiguous", seed=0),
     "raw_bias": bias} for bias in (0.0, 1000.0, 2000.0))


@check(area="forward", inputs={"feats": hs.drawn_feature_maps(max_batch=2, max_size=80),
                               "raw_bias": hs.drawn(st.sampled_from(RAW_BIASES), f"final vertex biases {RAW_BIASES}")},
       examples=DECODE_EXAMPLES, variants=variants(precision=("float32", "bfloat16-autocast", "float16")),
       max_examples=6)
def check_decode_consistency(subject, ctx, feats, raw_bias, precision):
    """Inference decode equals the training decode of the same raw outputs and stays finite in each dtype (R9).

    The training decode is the documented one (DFL expectation -> ltrb -> xywh pixels; vertices (2 * raw + anchor -
    0.5) * stride), with nothing clamped; compute dtypes: fp32, bf16 autocast, fp16 weights, and the inference output
    must be finite wherever the raw outputs are.

    Raw outputs are driven large by setting the final biases of the box and vertex branches to +-R (R up to 2e3:
    at stride 32 a vertex of raw 1e3 is 64,000 px, the edge of fp16)."""
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
    expected, rows = documented_decode(preds, feats, subject.strides)
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


@check(area="forward", inputs={"first": hs.drawn_feature_maps(), "other": hs.drawn_feature_maps()}, max_examples=5)
def check_inference_deterministic(subject, ctx, first, other):
    """Same eval input twice gives the same output, also after an input of another size (no stale caches)."""
    head = subject.build_head()
    y1, _ = eval_outputs(subject, head, first)
    y2, _ = eval_outputs(subject, head, first)
    eval_outputs(subject, head, other)
    y3, _ = eval_outputs(subject, head, first)
    for label, y in (("a repeated call", y2), ("a call after another input", y3)):
        if y.shape != y1.shape or not torch.equal(y.nan_to_num(), y1.nan_to_num()):
            diff = float((y - y1).abs().max()) if y.shape == y1.shape else "shape " + str(tuple(y.shape))
            raise CheckFailure(
                f"eval output changed on {label} with the same input (max |difference| {diff}); inference must be a "
                "pure function of its input: rebuild cached anchors/strides whenever the input shape changes"
            )


@check(area="forward", inputs={"feats": hs.drawn_feature_maps()}, variants=variants(mode=("train", "eval")),
       max_examples=5)
def check_forward_does_not_mutate_inputs(subject, ctx, feats, mode):
    """The caller's feature maps (the list and every tensor in it, of any layout) are unchanged by a forward."""
    head = subject.build_head().train(mode == "train")
    saved = [f.clone() for f in feats]
    ids = [id(f) for f in feats]
    with torch.no_grad():
        call(f"the head's {mode} forward", head, feats)
    if [id(f) for f in feats] != ids or len(feats) != len(saved):
        raise CheckFailure(
            f"the {mode} forward replaced items of the caller's feature-map list (x[i] = ...); build a new list "
            "instead of writing into the caller's"
        )
    for i, (f, s) in enumerate(zip(feats, saved)):
        if f.shape != s.shape or not torch.equal(f.nan_to_num(), s.nan_to_num()):
            raise CheckFailure(
                f"the {mode} forward changed the caller's feature map x[{i}] in place; use out-of-place ops "
                "(no inplace=True activation or `+=` on the inputs)"
            )
