"""Head contract and initialisation: output layout, deliberate init of every final conv, class prior, initial
losses, predictions and gradients at step 0 (R1, R2)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from headguard import strategies as hs
from headguard.testing import (
    branch_by_out_channels,
    branches,
    call,
    check,
    documented_decode,
    variants,
    anchor_grid,
    configured_prior,
    eval_outputs,
    features,
    final_convs,
    train_preds,
)
from headguard.layouts import EXTRAS, extra_channels
from headguard.registry import CheckFailure, CheckSkipped


def _reg_max(head) -> int:
    return int(getattr(head, "reg_max", 1))


def _anchor_count(feats) -> int:
    return sum(f.shape[-2] * f.shape[-1] for f in feats)


@check(area="head", gate=True, inputs={"feats": hs.drawn_feature_maps()}, max_examples=3)
def check_output_contract(subject, ctx, feats):
    """Training and eval outputs fit the head's layout: named outputs' shapes/dtypes and the eval y rows (a gate:
    the other checks read these), for any batch size and image size."""
    head = subject.build_head()
    b, a, nc, npv = feats[0].shape[0], _anchor_count(feats), subject.nc, subject.num_vertices
    expected = {"boxes": (b, 4 * _reg_max(head), a), "scores": (b, nc, a)}
    if npv:
        expected["polygons"] = (b, 2 * npv, a)
    preds = train_preds(subject, head, feats)
    _check_pred_dict(preds, expected, feats, "training forward")
    y, eval_preds = eval_outputs(subject, head, feats)
    rows = 4 + nc + extra_channels(eval_preds)
    if tuple(y.shape) != (b, rows, a):
        extras = [k for k in EXTRAS if k in eval_preds and k != "prototypes"]
        raise CheckFailure(
            f"eval y has shape {tuple(y.shape)}; expected (B, 4 + nc{''.join(f' + {k}' for k in extras)}, A) = "
            f"{(b, rows, a)}: xywh boxes in pixels, sigmoid class scores, then the extras per anchor"
        )
    if not y.is_floating_point():
        raise CheckFailure(f"eval y has dtype {y.dtype}; expected a floating dtype")
    scores = y[:, 4 : 4 + nc]
    if bool(((scores < 0) | (scores > 1)).any()):
        raise CheckFailure(
            f"eval y[:, 4:4+nc] holds values outside [0, 1] (min {float(scores.min()):.4g}, "
            f"max {float(scores.max()):.4g});"
            " expected sigmoid probabilities there"
        )
    _check_pred_dict(eval_preds, expected, feats, "eval forward's preds")


def _check_pred_dict(preds, expected, feats, where):
    if not isinstance(preds, dict):
        raise CheckFailure(
            f"the {where} is a {type(preds).__name__}; expected a dict with keys {sorted(expected)} + 'feats'"
        )
    missing = sorted(set(expected) - set(preds)) + ([] if "feats" in preds else ["feats"])
    if missing:
        raise CheckFailure(
            f"the {where} lacks keys {missing} (has {sorted(preds)}); expected {sorted(expected)} + 'feats'"
        )
    for key, shape in expected.items():
        t = preds[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckFailure(f"the {where}[{key!r}] has shape {found}; expected {shape} (B, channels, A)")
        if t.dtype != feats[0].dtype:
            raise CheckFailure(f"the {where}[{key!r}] has dtype {t.dtype}; expected the input dtype {feats[0].dtype}")
    if len(preds["feats"]) != len(feats):
        raise CheckFailure(f"the {where}['feats'] has {len(preds['feats'])} levels; expected {len(feats)}")


def _reinit_finals(head, feats, seed) -> nn.Module:
    """A copy whose final convs were reset with PyTorch's default init under `seed`, then bias_init() run."""
    twin = copy.deepcopy(head)
    torch.manual_seed(seed)
    for *_, conv in final_convs(twin, feats):
        conv.reset_parameters()
    if callable(getattr(twin, "bias_init", None)):
        twin.bias_init()
    return twin


@check(area="head")
def check_final_convs_initialised(subject, ctx):
    """The box and class branches' final convs are deliberately initialised; no final weight is all zero (R1, R2).

    Rule: reset every final conv with PyTorch's default (random) init under two different seeds, run the head's own
    `bias_init()` on each copy, and compare. A bias that `bias_init()` sets deliberately comes out identical in both;
    one it never touches keeps the two different random draws. A final conv whose weight is all zero is also
    rejected: its branch's output is then independent of the features and no layer before it gets a gradient.

    Drawing cannot find more here: the property is about what bias_init() writes, which no input changes (one
    training forward on seeded maps only finds the final convs).
    """
    head = subject.build_head()
    feats = features(subject, batch=1, seed=ctx.seed)
    finals = final_convs(head, feats)
    if not finals:
        raise CheckFailure(
            "found no per-level branches (top-level nn.ModuleList with one conv branch per level); the catalogue "
            "needs the head's branches as nn.ModuleList children"
        )
    if not callable(getattr(head, "bias_init", None)):
        raise CheckFailure(
            f"{type(head).__name__} has no bias_init(); every final conv ({', '.join(n for *_, n, _ in finals)}) keeps "
            "PyTorch's default uniform init: give the head a bias_init() that sets each one deliberately"
        )
    twins = [_reinit_finals(head, feats, ctx.seed + s) for s in (1, 2)]
    # The box and class biases have one right value (the box prior, log of the class prior): judged strictly.
    # Offset branches (vertices, keypoints, angles, mask coefficients) may keep a default bias: their init is judged
    # by its effect (check_initial_predictions_sane), and any of their final weights must still be non-zero (R2).
    strict = {*branch_by_out_channels(finals, 4 * _reg_max(head)), *branch_by_out_channels(finals, head.nc)}
    untouched, zero = [], []
    for (bname, _, name, conv) in finals:
        if conv.bias is not None and bname in strict:
            a, b = (dict(t.named_modules())[name].bias for t in twins)
            if not torch.equal(a, b):
                untouched.append(name)
        if not bool(conv.weight.detach().abs().sum() > 0):
            zero.append(name)
    if untouched:
        raise CheckFailure(
            f"{', '.join(n + '.bias' for n in untouched)} was never set by bias_init() (still PyTorch's default uniform"
            " init); every final conv of every branch must be initialised deliberately (an override of bias_init()"
            " must call the parent's)"
        )
    if zero:
        raise CheckFailure(
            f"{', '.join(n + '.weight' for n in zero)} is all zeros at init: the branch's output ignores the features,"
            " every decoded value of that branch is the same, and the layers before it get zero gradient; zero the"
            " bias if you must, never the final weight"
        )


@check(area="head")
def check_class_prior(subject, ctx):
    """exp of the class branch's final bias matches the configured prior per level (R1).

    Drawing cannot find more here: the bias and the prior are fixed numbers of the built head; no input changes
    them (check_initial_cls_loss_bounded judges their effect on drawn batches)."""
    head = subject.build_head()
    feats = features(subject, batch=1, seed=ctx.seed)
    finals = final_convs(head, feats)
    cls_branch = _class_branch(head, finals)
    for bname, level, name, conv in finals:
        if bname != cls_branch:
            continue
        prior = configured_prior(head, level, subject.strides[level])
        bias = conv.bias.detach()[: head.nc].double() if conv.bias is not None else torch.zeros(head.nc)
        # bias = log(p) is the Ultralytics convention, sigmoid(bias) = p the RetinaNet one; accept either.
        got = bias.exp()
        ok = torch.isclose(got, torch.tensor(prior, dtype=torch.float64), rtol=1e-3) | torch.isclose(
            bias.sigmoid(), torch.tensor(prior, dtype=torch.float64), rtol=1e-3
        )
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0, 0])
            raise CheckFailure(
                f"{name}.bias[{bad}] = {float(bias[bad]):.4g} implies a class prior of sigmoid = "
                f"{float(bias[bad].sigmoid()):.4g}; the configured prior at level {level} (stride "
                f"{subject.strides[level]:g}) is {prior:.4g}, i.e. bias = log(prior) = {math.log(prior):.4g}: "
                "bias_init() must set every class bias from the prior"
            )


def _class_branch(head, finals) -> str:
    """The branch whose final convs output nc channels; Ultralytics' name `cv3` breaks a tie of widths."""
    named = branch_by_out_channels(finals, head.nc)
    if len(named) == 1:
        return named[0]
    if "cv3" in named:
        return "cv3"
    raise CheckSkipped(f"cannot tell the class branch: branches whose final conv has nc={head.nc} outputs: {named}")


def _cls_gain(loss) -> float:
    gains = getattr(loss, "gains", None)
    # 0.5 is Ultralytics' default hyp.cls, the gain the reference DetectionGains documents.
    return float(getattr(gains, "cls", 0.5))


@check(area="head", inputs={"batch": hs.drawn_training_batches()}, max_examples=5)
def check_initial_cls_loss_bounded(subject, ctx, batch):
    """Initial cls loss item below a bound derived from the class prior (R1).

    Per element, BCE(x, t) = softplus(x) - t * x, so with T = sum of target scores,
        cls_item = gain * (sum softplus(x) - sum t * x) / max(1, T) <= gain * (sum softplus(x) + max(-x, 0)),
    because sum t * (-x) <= T * max(-x) and T / max(1, T) <= 1. At init x = log(p_level) + z, where z is what the
    conv weights add to the bias (measured from the head's own output). The bound evaluates the right-hand side with
    the bias replaced by the configured prior's log(p), times 1.25 for float error; a class bias left at 0
    (sigmoid 0.5) gives softplus(0) = 0.69 per anchor and class, hundreds of times the bound. The bound holds for
    any targets, so the batch (feature maps and objects) is drawn.
    """
    feats, targets = batch
    head = subject.build_head()
    preds = train_preds(subject, head, feats)
    loss = subject.build_loss(head)
    with torch.no_grad():
        _, items = call("the loss", loss, preds, targets)
    cls_item = float(items["cls_loss"])
    finals = final_convs(head, feats)
    cls_branch = _class_branch(head, finals)
    biases = {lvl: conv.bias.detach()[: head.nc] for b, lvl, _, conv in finals if b == cls_branch}
    logits = preds["scores"].detach().double()  # (B, nc, A)
    ideal = []
    start = 0
    for level, (h, w) in enumerate(f.shape[-2:] for f in feats):
        chunk = logits[:, :, start : start + h * w]
        start += h * w
        z = chunk - biases[level].double().view(1, -1, 1)
        ideal.append(z + math.log(configured_prior(head, level, subject.strides[level])))
    x = torch.cat(ideal, -1)
    bound = 1.25 * _cls_gain(loss) * float(F.softplus(x).sum() + (-x).clamp(min=0).max())
    if not math.isfinite(cls_item) or cls_item > bound:
        raise CheckFailure(
            f"initial cls_loss item is {cls_item:.4g}; with class logits at the configured prior it would be at most "
            f"{bound:.4g} (batch {logits.shape[0]}, {logits.shape[-1]} anchors, nc={head.nc}). "
            "Either bias_init() did not set the class bias to log(prior), or the loss normalises cls by something "
            "other than max(1, sum of target scores)"
        )


@check(area="head", inputs={"feats": hs.drawn_feature_maps(min_batch=2, typical=True, fills=("normal", "signs"))},
       variants=variants(mode=("eval", "train")), max_examples=5)
def check_initial_predictions_sane(subject, ctx, feats, mode):
    """Initial boxes centred near their anchors; initial polygons near their anchors with non-zero spread (R2).

    Judged on what validation sees (the eval output, running statistics) and on what the loss sees at the first
    step (the training outputs decoded as documented, batch statistics), for feature maps of ordinary magnitude."""
    y, has_boxes = _initial_decode(subject, subject.build_head(), feats, mode)
    centres, strides = _anchor_pixels(subject, feats)
    # Boxes: at init the left/right (top/bottom) distances come from the same distribution, so the centre sits at
    # the anchor up to noise; a mean offset beyond one cell means an asymmetric bias in the box branch.
    offset = ((y[:, :2] - centres) / strides).abs().mean()
    if has_boxes and not bool(offset <= 1.0):
        raise CheckFailure(
            f"initial box centres are on average {float(offset):.3g} strides from their anchors; expected <= 1 cell: "
            "check the box branch's final bias (equal for left/right and top/bottom) and the decode"
        )
    npv = subject.num_vertices
    if not npv:
        return
    verts = y[:, 4 + subject.nc :].reshape(y.shape[0], npv, 2, -1)  # (B, np, 2, A)
    rel = (verts - centres.unsqueeze(1)) / strides.unsqueeze(1)
    spread = verts.std(dim=1).norm(dim=1) / strides  # (B, A) in cells
    # Below 1 % of a cell a polygon is a point to any area-based loss (zero gradient or 0/0, R2). The median is judged:
    # with a zero final bias the spread comes from the random weights alone, so single anchors can be small (reference
    # measured: median ~0.1 cells, minimum ~0.03), while R2's zeroed weights give exactly 0 everywhere.
    degenerate = int((spread < 0.01).sum())
    if not bool(spread.median() >= 0.01):
        raise CheckFailure(
            f"initial polygons are degenerate: median vertex spread {float(spread.median()):.3g} cells, "
            f"{degenerate} of {spread.numel()} anchors below 0.01 (all vertices at one point); the vertex branch's "
            "final conv must give distinct vertices at init (do not zero its weights; keep random weights or give "
            "its bias a polygon pattern)"
        )
    distance = rel.norm(dim=2).mean()
    if not bool(distance <= 4.0):
        raise CheckFailure(
            f"initial polygon vertices are on average {float(distance):.3g} strides from their anchors; expected <= 4 "
            "cells (an anchor cannot see objects far beyond its receptive field): check the vertex branch's init"
        )


def _initial_decode(subject, head, feats, mode: str) -> tuple[torch.Tensor, bool]:
    """(the decoded predictions as eval y lays them out (B, 4 + nc + extras, A), float64; whether its box rows are
    decoded): the eval output itself, or the training outputs decoded as documented (`documented_decode`; the rows
    it has no decode for, rotated boxes among them, are NaN)."""
    if mode == "eval":
        return eval_outputs(subject, head, feats)[0].double(), True
    with torch.no_grad():
        preds = train_preds(subject, head, feats)
    decoded, rows = documented_decode(preds, feats, subject.strides)
    y = torch.full((decoded.shape[0], max(rows) + 1, decoded.shape[-1]), math.nan, dtype=torch.float64)
    y[:, rows] = decoded
    return y, 0 in rows


def _anchor_pixels(subject, feats):
    """Anchor centres (1, 2, A) in pixels and strides (1, 1, A), laid out like the eval output's columns."""
    points, strides = anchor_grid(feats, subject.strides)
    return (points * strides[:, None]).T.unsqueeze(0), strides.view(1, 1, -1)


# Every level must get positives for every parameter to get a gradient. At init a DFL box spans about
# reg_max / 2 bins each side (15 strides wide for reg_max 16), and the assigner prefers the level whose initial box
# overlaps the object most, so the image must be large enough for an object of that size at the coarsest level.
LEVEL_IMAGE = 512


def _per_level_targets(subject, head) -> dict[str, torch.Tensor]:
    """One object per level, sized like that level's initial predicted box, centred in the image (one image)."""
    span = max(1, _reg_max(head) - 1)
    sides = [min(0.95, span * s / LEVEL_IMAGE) for s in subject.strides]
    n = len(sides)
    boxes = torch.tensor([[0.5, 0.5, side, side] for side in sides], dtype=torch.float32)
    out = {"batch_idx": torch.zeros(n), "cls": (torch.arange(n) % subject.nc).float().view(n, 1), "bboxes": boxes}
    npv = subject.num_vertices
    if npv:
        angle = torch.arange(npv) * (2 * math.pi / npv)
        ring = torch.stack((angle.cos(), angle.sin()), -1)  # (np, 2)
        out["polygons"] = 0.5 + ring.unsqueeze(0) * boxes[:, 2:].unsqueeze(1) / 2
        out["polygon_mask"] = torch.ones(n, npv, dtype=torch.bool)
    return hs.from_head(subject).task_targets(out, batch_size=1)  # keypoints, angles, masks for task heads


def _level_image_maps(**kwargs) -> hs.Input:
    """Feature maps of one LEVEL_IMAGE-pixel image, of ordinary magnitude."""
    return hs.drawn_feature_maps(min_batch=1, max_batch=1, min_size=LEVEL_IMAGE, max_size=LEVEL_IMAGE, typical=True,
                                 fills=("normal", "signs"), **kwargs)


def _backward_at_init(subject, feats, init):
    head = init(subject.build_head())
    preds = train_preds(subject, head, feats)
    batch = _per_level_targets(subject, head)
    vector, _ = call("the loss", subject.build_loss(head), preds, batch)
    call("backward of the loss", vector.sum().backward)
    return head


@check(area="head", inputs={"feats": _level_image_maps(), "init": hs.drawn_initialisations(scales=(0.1, 10.0))},
       max_examples=3)
def check_every_parameter_gets_gradient(subject, ctx, feats, init):
    """Every trainable parameter receives a non-None, not-all-zero gradient at init (as shipped, scaled, perturbed).

    One object per level, sized like that level's initial box, so that every level has positives."""
    head = _backward_at_init(subject, feats, init)
    none = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    zero = [
        n for n, p in head.named_parameters()
        if p.requires_grad and p.grad is not None and not bool(p.grad.abs().sum() > 0)
    ]
    if none:
        raise CheckFailure(
            f"{len(none)} trainable parameters got no gradient (None), e.g. {none[:4]}: they are not used by the "
            "outputs the loss reads; remove them, freeze them (requires_grad=False), or wire them into the output"
        )
    if zero:
        raise CheckFailure(
            f"{len(zero)} trainable parameters got an all-zero gradient, e.g. {zero[:4]}: something after them "
            "blocks the signal (a zeroed final weight, a detached or constant output); they will never train"
        )


def _total_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])))


@check(area="head", inputs={"feats": _level_image_maps(), "init": hs.drawn_initialisations(scales=(), noises=(0.1,))},
       max_examples=3)
def check_gradient_norm_bounded(subject, ctx, feats, init):
    """Initial gradient norm is finite and bounded; no branch's gradient dwarfs another's by 1e4 or more.

    Bounds: the total must be at most 100 x the default clipping norm (10): a larger step-0 gradient is rescued by
    clipping, not trained. Ratio 1e4: beyond that, under one learning rate and one clip, the smaller branch does not
    move at all while the larger one dominates. Reference measured (512 px, one object per level): total 5.1-5.6,
    largest branch ratio (cv2 / cv3) 6-8. Drawn: the feature maps, and the shipped init perturbed by noise of a
    fraction of each weight's spread (scaled weights are another head's init, whose gradients may rightly be large).
    """
    head = _backward_at_init(subject, feats, init)
    total = _total_norm([p.grad for p in head.parameters() if p.grad is not None])
    if not math.isfinite(total) or total > 1e3:
        raise CheckFailure(
            f"initial total gradient norm is {total:.4g}; expected finite and <= 1e3 (100 x the clip norm 10): "
            "check the loss normalisation and the final biases"
        )
    norms = {}
    for bname, blist in branches(head, len(subject.strides)):
        gs = [p.grad.double() for p in blist.parameters() if p.grad is not None]
        norms[bname] = _total_norm(gs) if gs else 0.0
    if len(norms) >= 2:
        big = max(norms, key=norms.get)
        small = min(norms, key=norms.get)
        if norms[small] == 0 or norms[big] / norms[small] >= 1e4:
            raise CheckFailure(
                f"branch {big}'s initial gradient norm {norms[big]:.4g} dwarfs branch {small}'s {norms[small]:.4g} "
                f"(ratio {norms[big] / max(norms[small], 1e-300):.3g} >= 1e4); per-branch norms {norms}: check that "
                "branch's loss gain, normalisation and initial bias"
            )
