"""Deliberately broken heads, losses and training steps: each a small subclass or wrapper of the reference.

`R0_SPEC` ... `R11_SPEC` reproduce the real bugs of /work/shared/bugs/README.md (tests/regression/, one file per bug);
each mutant's docstring names its bug in one line. `MUTANTS` maps every catalogue check to the mutant it must fail
on and `MESSAGES` to a fragment of the message it must give, so a check cannot join the catalogue without a mutant
(tests/meta/test_every_check_fails_on_a_mutant.py). `REFERENCE` is the reference Polygon spec, with its declared
expected failures, on which every check must pass. `check_outcome` runs a check once per session (cached), under the
deterministic `ci` profile.
"""

from __future__ import annotations

from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F

import heads
import losses
from headguard import CATALOGUE, CheckFailure, HeadSpec, build_subject, training
from headguard.isolation import seeded
from headguard.reference import REFERENCE_SPECS, covering_spec
from headguard.registry import CheckContext
from headguard.subject import DEFAULT_CHANNELS as CHANNELS  # re-exported: the subject's default head widths
from headguard.subject import DEFAULT_STRIDES as STRIDES
from heads._blocks import DFL
from heads._decode import dist2bbox, make_anchors
from losses._vertex import l2_vertex_loss, vertex_term


# ================================================================================================== training steps
def step_skips_without_restoring_buffers(*args, **kwargs):
    """R0: a non-finite step is skipped (as GradScaler does) but the BatchNorm statistics its forward wrote stay."""
    # The reference step minus its one line of defence: restoring the buffers of a skipped step.
    with mock.patch.object(training, "_restore_buffers", lambda module, saved: None):
        return training.train_step(*args, **kwargs)


_clip_grad_norm = torch.nn.utils.clip_grad_norm_


def _clip_each_tensor(parameters, max_norm, *args, **kwargs):
    """clip_grad_norm_ per tensor; returns the total norm before clipping, as the real function does."""
    norms = torch.stack([_clip_grad_norm([p], max_norm, *args, **kwargs) for p in parameters])
    return torch.linalg.vector_norm(norms)


def step_clips_each_tensor(*args, **kwargs):
    """Gradient clipping applied to each parameter tensor separately: the total norm, and the update, are unbounded."""
    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", _clip_each_tensor):
        return training.train_step(*args, **kwargs)


def step_rescales_lr_every_call(head, loss_fn, optimizer, feats, batch, **kwargs):
    """The linear lr-scaling rule (lr *= batch size) applied inside the step, so the lr doubles at every step."""
    for group in optimizer.param_groups:
        group["lr"] *= feats[0].shape[0]
    return training.train_step(head, loss_fn, optimizer, feats, batch, **kwargs)


# ============================================================================================================ heads
class PolygonDroppedPriors(heads.Polygon):
    """R1: a `bias_init` override for cv4 that never calls the parent's, so cv2/cv3 keep PyTorch's default bias."""

    def bias_init(self, box_bias: float = 2.0, img_size: float = 640, objects_per_image: float = 5.0) -> None:
        with torch.no_grad():
            for branch in self.cv4:
                branch[-1].bias.zero_()


class PolygonZeroedVertexWeights(heads.Polygon):
    """R2: `bias_init` zeroes cv4's final weights as well as its bias: every vertex of every polygon is one point."""

    def bias_init(self, *args, **kwargs) -> None:
        super().bias_init(*args, **kwargs)
        with torch.no_grad():
            for branch in self.cv4:
                branch[-1].weight.zero_()


def decode_polygons_in_input_dtype(raw, anchor_points, stride_tensor):
    """R9: the vertex decode computed in the raw outputs' dtype: fp16 overflows once 2*raw*stride passes 65504."""
    b, c, a = raw.shape
    xy = raw.view(b, c // 2, 2, a)
    anchors = anchor_points.to(raw.dtype).t().reshape(1, 1, 2, a)
    return ((2 * xy + anchors - 0.5) * stride_tensor.to(raw.dtype).reshape(1, 1, 1, a)).view(b, c, a)


class PolygonDecodesInInputDtype(heads.Polygon):
    """R9 before the "fix": vertices decoded in the head's dtype, so an fp16 head overflows at raw ~1000, stride 32."""

    def decode(self, preds: dict) -> torch.Tensor:
        anchors, strides = make_anchors(preds["feats"], self.stride)
        vertices = decode_polygons_in_input_dtype(preds["polygons"], anchors, strides)
        return torch.cat((heads.Detect.decode(self, preds), vertices), 1)


class PolygonClampedAtInference(heads.Polygon):
    """R9: raw vertex outputs clamped to +-50 at inference only, to hide the fp16 overflow: decodes disagree."""

    def decode(self, preds: dict) -> torch.Tensor:
        return super().decode(dict(preds, polygons=preds["polygons"].clamp(-50, 50)))


class NaiveSoftmaxDFL(DFL):
    """exp(x) / sum(exp(x)) without subtracting the max: inf / inf = NaN once a bin logit passes ~88 (fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        e = x.view(b, 4, self.c1, a).exp()
        probs = e / e.sum(2, keepdim=True)
        return torch.einsum("bsca,c->bsa", probs, self.conv.weight.view(self.c1).to(probs.dtype))


class DetectNaiveSoftmax(heads.Detect):
    """A hand-written DFL softmax that overflows for large box logits (eval outputs NaN for large features)."""

    def __init__(self, nc: int = 80, reg_max: int = 16, ch=()):
        super().__init__(nc=nc, reg_max=reg_max, ch=ch)
        self.dfl = NaiveSoftmaxDFL(reg_max)


class DetectScoresWithoutSigmoid(heads.Detect):
    """Eval `y` carries raw class logits instead of sigmoid probabilities (breaks the Ultralytics output contract)."""

    def decode(self, preds: dict) -> torch.Tensor:
        y = super().decode(preds)
        return torch.cat((y[:, :4], preds["scores"]), 1)


class DetectFunctionalDropout(heads.Detect):
    """`F.dropout(x, p)` defaults to training=True, so inference drops features at random."""

    def forward(self, x):
        return super().forward([F.dropout(f, 0.1) for f in x])


class DetectInplacePreActivation(heads.Detect):
    """An in-place pre-activation on the inputs (`F.silu(x, inplace=True)`) rewrites the caller's feature maps."""

    def forward(self, x):
        return super().forward([F.silu(f, inplace=True) for f in x])


class DetectPooledContextView(heads.Detect):
    """Global context pooled from the inputs with `.view(b, c, -1)`: fine on the contiguous maps a single seeded
    draw gives, a crash on channels-last or transposed maps (what AMP and torch.compile hand a head)."""

    def forward(self, x):
        context = [f.view(f.shape[0], f.shape[1], -1).mean(-1)[..., None, None] for f in x]
        return super().forward([f + 0 * c for f, c in zip(x, context)])


class DetectUnusedBranch(heads.Detect):
    """A half-finished head: a vertex branch `cv4` is built (and trainable) but never used by forward."""

    def __init__(self, nc: int = 80, reg_max: int = 16, ch=()):
        super().__init__(nc=nc, reg_max=reg_max, ch=ch)
        self.cv4 = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 1) for c in ch)


# ========================================================================================================== losses
def _cls_factor(terms: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A (3,) multiplier of the detection terms (box, cls, dfl) that changes only the cls normaliser."""
    one = torch.ones_like(factor)
    return torch.stack((one, factor, one)).to(terms.dtype)


class DetectionLossClsOverAnchors(losses.DetectionLoss):
    """R3: class BCE divided by anchors x classes (a plain mean) instead of max(1, sum of target scores)."""

    def detection_terms(self, preds, batch):
        terms, det = super().detection_terms(preds, batch)
        b, a, nc = det.target_scores.shape
        return terms * _cls_factor(terms, det.target_scores_sum / (b * a * nc)), det


class DetectionLossUnclampedNormaliser(losses.DetectionLoss):
    """R10: class BCE divided by the sum of target scores, not max(1, sum), which is 0 for an all-background batch."""

    def detection_terms(self, preds, batch):
        terms, det = super().detection_terms(preds, batch)
        return terms * _cls_factor(terms, det.target_scores_sum / det.target_scores.sum()), det


class DetectionLossFlatRows(losses.DetectionLoss):
    """R5: the assigner's per-image gt index used as a row of the flat batch: image b learns image 0's objects."""

    def detection_terms(self, preds, batch):
        terms, det = super().detection_terms(preds, batch)
        slots = torch.arange(det.gt_rows.shape[1], device=det.gt_rows.device).expand_as(det.gt_rows)
        return terms, det._replace(gt_rows=torch.where(det.mask_gt, slots, det.gt_rows))


class _PolygonLossOver(losses.PolygonLoss):
    """A PolygonLoss whose inner detection loss is `detection_cls` (same settings): mutants of the shared terms."""

    detection_cls = losses.DetectionLoss

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d = self.detection
        self.detection = self.detection_cls(d.nc, d.strides, reg_max=d.reg_max, gains=d.gains, assigner=d.assigner)


class PolygonLossClsOverAnchors(_PolygonLossOver):
    """R3: the polygon loss's cls term normalised over all anchors to hide R1 (the detection loss's is not)."""

    detection_cls = DetectionLossClsOverAnchors


class PolygonLossUnclampedNormaliser(_PolygonLossOver):
    """R10: cls divided by a target-score sum that is 0 for a background-only batch."""

    detection_cls = DetectionLossUnclampedNormaliser


class PolygonLossFlatRows(_PolygonLossOver):
    """R5: each positive's ground-truth polygon looked up in the flat batch with a per-image index."""

    detection_cls = DetectionLossFlatRows


class PolygonLossCapsObjectsPerImage(losses.PolygonLoss):
    """A fixed-size target buffer: objects after the first `cap` of an image are dropped silently, so which objects
    count depends on their order within the image."""

    cap = 2

    def terms(self, preds, batch, progress=0.0):
        image = batch["batch_idx"].long()
        onehot = torch.nn.functional.one_hot(image, int(image.max()) + 1 if image.numel() else 1)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position of each row within its image
        keep = rank < self.cap
        return super().terms(preds, {k: v[keep] for k, v in batch.items()}, progress)


def _with_polygon_term(t, polygon: torch.Tensor):
    """PolygonTerms `t` with its polygon entry (index 1 of box, polygon, cls, dfl) replaced."""
    return t._replace(vector=torch.cat((t.vector[:1], polygon.to(t.vector.dtype)[None], t.vector[2:])))


class PolygonLossSummedOverImages(losses.PolygonLoss):
    """R4: per-image polygon losses accumulated and never averaged: the term grows with the batch size."""

    def terms(self, preds, batch, progress=0.0):
        t = super().terms(preds, batch, progress)
        det = t.detection
        image = det.fg_mask.nonzero(as_tuple=True)[0]
        per_image = t.per_anchor.new_zeros(det.fg_mask.shape[0]).index_add(0, image, t.per_anchor * t.weight)
        norm = det.target_scores.sum((1, 2)).clamp(min=1).to(per_image.dtype)
        return _with_polygon_term(t, (per_image / norm).sum() * self.gains.polygon)


class PolygonLossInPixels(losses.PolygonLoss):
    """The vertex L2 taken in pixels^2 without the area normalisation: its gradient dwarfs every other branch's."""

    def terms(self, preds, batch, progress=0.0):
        t = super().terms(preds, batch, progress)
        det = t.detection
        stride = det.stride_tensor[det.fg_mask.nonzero(as_tuple=True)[1]].to(t.pred.dtype)  # (P, 1)
        squared = (((t.pred - t.target) * stride[:, :, None]) ** 2).sum(-1) * t.mask
        per_anchor = squared.sum(-1) / t.mask.sum(-1)
        return _with_polygon_term(t, (per_anchor * t.weight).sum() / det.target_scores_sum * self.gains.polygon)


class PolygonLossFloat32Buffer(losses.PolygonLoss):
    """The polygon term summed in a buffer of the default dtype: float64 predictions die in an opaque RuntimeError."""

    def terms(self, preds, batch, progress=0.0):
        t = super().terms(preds, batch, progress)
        det = t.detection
        image = det.fg_mask.nonzero(as_tuple=True)[0]
        summed = torch.zeros(det.fg_mask.shape[0]).index_add_(0, image, t.per_anchor * t.weight).sum()
        return _with_polygon_term(t, summed / det.target_scores_sum * self.gains.polygon)


class PolygonLossMasksNonfinite(losses.PolygonLoss):
    """R8: NaN/Inf class logits replaced by -10 and box/vertex outputs by 0: a quiet finite loss on corrupt outputs."""

    def loss(self, preds, batch, progress=0.0):
        preds = dict(losses.DetectionLoss.parse_output(preds))
        preds["scores"] = torch.nan_to_num(preds["scores"], nan=-10.0, posinf=-10.0, neginf=-10.0)
        for key in ("boxes", "polygons"):
            preds[key] = torch.nan_to_num(preds[key], nan=0.0, posinf=0.0, neginf=0.0)
        return super().loss(preds, batch, progress)


class PolygonLossCountsCalls(losses.PolygonLoss):
    """The hybrid blend's progress taken from a call counter inside the loss instead of the caller: hidden state."""

    calls = 0

    def loss(self, preds, batch, progress=0.0):
        self.calls += 1
        return super().loss(preds, batch, min(1.0, self.calls / 100))


def l2_cleaned_after_division(pred, target, pred_mask=None, target_mask=None):
    """R7: an L2 shape loss over the target's bounding-box area, NaN/Inf of zero-area targets cleaned AFTER the
    division (a `vertex_loss`, the signature of losses.mgiou)."""
    mask = torch.ones_like(target[..., 0], dtype=torch.bool) if target_mask is None else target_mask
    squared = ((pred - target) ** 2).sum(-1) * mask
    extent = target.amax(1) - target.amin(1)
    per_polygon = squared.sum(-1) / mask.sum(-1) / (extent[:, 0] * extent[:, 1])
    return torch.where(torch.isfinite(per_polygon), per_polygon, torch.zeros_like(per_polygon))


class PolygonLossCleanedAfterDivision(losses.PolygonLoss):
    """R7: a finite loss whose backward still meets 0 * inf: NaN gradients for zero-area targets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, vertex_loss=l2_cleaned_after_division, **kwargs)


def _positive_areas(det) -> torch.Tensor:
    """(P,) each positive's matched box area in its own stride units (what the l2 vertex term divides by)."""
    image, anchor = det.fg_mask.nonzero(as_tuple=True)
    box = det.target_bboxes[image, anchor] / det.stride_tensor[anchor]
    return (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])


def _vertex_term_of(loss, t, per_anchor):
    """PolygonTerms `t` with its polygon term recomputed from `per_anchor` (P,) under the reference reduction."""
    det = t.detection
    return _with_polygon_term(t, (per_anchor * t.weight).sum() / det.target_scores_sum * loss.gains.polygon)


class PolygonLossWrongLevelStride(losses.PolygonLoss):
    """The measured fork bug: the polygon targets of the coarsest level converted to stride units with the previous
    level's stride, so they are twice too large there and even predictions that decode exactly onto the targets have
    a polygon loss."""

    def terms(self, preds, batch, progress=0.0):
        t = super().terms(preds, batch, progress)
        det = t.detection
        stride = det.stride_tensor[det.fg_mask.nonzero(as_tuple=True)[1]].to(t.target.dtype)  # (P, 1)
        coarsest, previous = self.detection.strides[-1], self.detection.strides[-2]
        used = torch.where(stride == coarsest, torch.full_like(stride, previous), stride)
        target = t.target * (stride / used)[:, :, None]
        per_anchor = vertex_term(t.pred, target, t.mask, _positive_areas(det), self.term, progress, self.shape_loss,
                                 t.mask)
        return _vertex_term_of(self, t, per_anchor)


class PolygonLossAreaOfFirstObject(losses.PolygonLoss):
    """A per-object term that mixes objects: each positive's vertex L2 divided by the area of its image's FIRST object,
    broadcast across the image's instances, instead of by its own object's area."""

    def terms(self, preds, batch, progress=0.0):
        t = super().terms(preds, batch, progress)
        det = t.detection
        image, anchor = det.fg_mask.nonzero(as_tuple=True)
        first = det.gt_bboxes[image, 0] / det.stride_tensor[anchor]  # the image's first slot, in this anchor's units
        area = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
        return _vertex_term_of(self, t, l2_vertex_loss(t.pred, t.target, t.mask, area))


class DetectionLossBoxOffset(losses.DetectionLoss):
    """A box term consistently wrong by a constant: 1 - CIoU + 0.02 per positive (an epsilon in the wrong place)."""

    offset = 0.02

    def detection_terms(self, preds, batch):
        terms, det = super().detection_terms(preds, batch)
        shift = self.gains.box * self.offset * det.target_scores.sum() / det.target_scores_sum
        return terms + torch.stack((shift, torch.zeros_like(shift), torch.zeros_like(shift))).to(terms.dtype), det


class PolygonLossBoxOffset(_PolygonLossOver):
    """A polygon loss declared of the reference "polygon" family whose box term is off by a constant per positive."""

    detection_cls = DetectionLossBoxOffset
    loss_family = "polygon"


def _inside_any_object(preds, batch, strides) -> torch.Tensor:
    """(B, A) bool: the anchor's centre lies inside one of its image's target boxes."""
    anchors, stride = make_anchors(preds["feats"], strides)
    h, w = (torch.tensor(preds["feats"][0].shape[-2:]) * strides[0]).tolist()
    points = anchors * stride  # (A, 2) pixels
    boxes = torch.cat((batch["bboxes"][:, :2] - batch["bboxes"][:, 2:] / 2,
                       batch["bboxes"][:, :2] + batch["bboxes"][:, 2:] / 2), 1) * torch.tensor([w, h, w, h])
    inside = ((points[None] > boxes[:, None, :2]) & (points[None] < boxes[:, None, 2:])).all(-1)  # (N, A)
    image = torch.nn.functional.one_hot(batch["batch_idx"].long(), preds["scores"].shape[0]).T.float()  # (B, N)
    return (image @ inside.float()) > 0


class PolygonLossCleansBackgroundNonfinite(losses.PolygonLoss):
    """R8 at background anchors only: non-finite class logits of anchors inside no object become -10 before the loss
    (a NaN at a positive still raises), so a corrupt background branch trains on quietly."""

    def loss(self, preds, batch, progress=0.0):
        preds = dict(losses.DetectionLoss.parse_output(preds))
        background = ~_inside_any_object(preds, batch, self.detection.strides)[:, None]
        scores = preds["scores"]
        preds["scores"] = torch.where(background & ~torch.isfinite(scores), torch.full_like(scores, -10.0), scores)
        return super().loss(preds, batch, progress)


# =========================================================================================================== MGIoU
def _unguarded_mgiou(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """MGIoU loss (N,) as first written: computed in the input dtype, `overlap / (hull + eps)` on every axis, and
    degenerate axes (zero hull) "masked" by multiplying their GIoU by 0 after the division."""
    edges = torch.cat((pred.roll(-1, 1) - pred, target.roll(-1, 1) - target), 1)
    axes = torch.stack((-edges[..., 1], edges[..., 0]), -1)  # (N, Vp + Vt, 2) edge normals
    proj_p, proj_t = axes @ pred.transpose(1, 2), axes @ target.transpose(1, 2)
    p_lo, p_hi, t_lo, t_hi = proj_p.amin(-1), proj_p.amax(-1), proj_t.amin(-1), proj_t.amax(-1)
    overlap = torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo)
    hull = torch.maximum(p_hi, t_hi) - torch.minimum(p_lo, t_lo)
    valid = (hull > 0).to(pred.dtype)
    giou = overlap / (hull + torch.tensor(eps, dtype=pred.dtype)) * valid
    return (1 - giou.sum(1) / valid.sum(1).clamp(min=1)) / 2


def mgiou_tiny_eps(pred, target, pred_mask=None, target_mask=None, **_):
    """R6: MGIoU with eps = 1e-9 in the compute dtype (0 in fp16), NaN * 0 masking: NaN for degenerate fp16 shapes."""
    return _unguarded_mgiou(pred, target, 1e-9)


def mgiou_nan_times_zero(pred, target, pred_mask=None, target_mask=None, **_):
    """R6: MGIoU without an epsilon whose degenerate axes are masked by multiplying by 0: NaN * 0 = NaN in any dtype."""
    return _unguarded_mgiou(pred, target, 0.0)


class PolygonLossUnguardedMGIoU(losses.PolygonLoss):
    """R6: the MGIoU vertex term without a usable epsilon, degenerate axes masked by NaN * 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, vertex_loss=mgiou_nan_times_zero, **kwargs)


# =========================================================================================================== specs
def _reference_spec(head) -> HeadSpec:
    """The reference's own spec, with its declared expected failures."""
    return REFERENCE_SPECS[head]


def _loss(cls=losses.PolygonLoss, **kwargs):
    return partial(cls.for_head, **kwargs)


REFERENCE = _reference_spec(heads.Polygon)
REFERENCE_DETECT = _reference_spec(heads.Detect)
REFERENCE_MGIOU = HeadSpec(heads.Polygon, loss=_loss(mode="mgiou"))
REFERENCE_COVERAGE = covering_spec(heads.Polygon)  # the R11 remedy: AssignerConfig(ensure_coverage=True)


class DetectGridsFor640(heads.Detect):
    """Anchor columns precomputed for images up to 640 px (80 cells at stride 8) and sliced per call: right for
    every small image, wrong for 672 px (one of the 30 bugs: "precomputed grids")."""

    def decode(self, preds):
        limit = [int(640 // float(s)) for s in self.stride]
        feats = [f[..., : min(f.shape[-2], n), : min(f.shape[-1], n)] for f, n in zip(preds["feats"], limit)]
        anchors, strides = make_anchors(feats, self.stride)
        dist = self.dfl(preds["boxes"])[..., : anchors.shape[0]]
        boxes = dist2bbox(dist, anchors.t().unsqueeze(0), xywh=True, dim=1) * strides.t()
        return torch.cat((boxes, preds["scores"][..., : anchors.shape[0]].sigmoid()), 1)


R0_SPEC = HeadSpec(heads.Polygon, train_step=step_skips_without_restoring_buffers)
R1_SPEC = HeadSpec(PolygonDroppedPriors)
R2_SPEC = HeadSpec(PolygonZeroedVertexWeights, loss=_loss(mode="mgiou"))
R2_UNGUARDED_SPEC = HeadSpec(PolygonZeroedVertexWeights, loss=_loss(PolygonLossUnguardedMGIoU))
R3_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossClsOverAnchors))
R4_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossSummedOverImages))
R5_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossFlatRows))
R6_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossUnguardedMGIoU))
R7_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossCleanedAfterDivision))
R8_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossMasksNonfinite))
R9_SPEC = HeadSpec(PolygonClampedAtInference)
R9_UNCLAMPED_SPEC = HeadSpec(PolygonDecodesInInputDtype)
R10_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossUnclampedNormaliser))
# The Ultralytics-compatible assigner, without the reference's declaration of the known failure.
R11_SPEC = HeadSpec(heads.Polygon, loss=_loss(assigner=losses.AssignerConfig(ensure_coverage=False)))

CLIP_SPEC = HeadSpec(heads.Polygon, train_step=step_clips_each_tensor)
LR_SPEC = HeadSpec(heads.Polygon, train_step=step_rescales_lr_every_call)
PIXELS_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossInPixels))
ORDER_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossCapsObjectsPerImage))
DTYPE_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossFloat32Buffer))
STATEFUL_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossCountsCalls, mode="hybrid"))
GRIDS_SPEC = HeadSpec(DetectGridsFor640)
CONTRACT_SPEC = HeadSpec(DetectScoresWithoutSigmoid)
EXTREME_SPEC = HeadSpec(DetectNaiveSoftmax)
DROPOUT_SPEC = HeadSpec(DetectFunctionalDropout)
INPLACE_SPEC = HeadSpec(DetectInplacePreActivation)
UNUSED_SPEC = HeadSpec(DetectUnusedBranch)
# A bug only drawn inputs reach (the layouts of the feature maps), not one standard-normal draw (tests/meta).
VIEW_SPEC = HeadSpec(DetectPooledContextView)
WRONG_STRIDE_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossWrongLevelStride))
AREA_BROADCAST_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossAreaOfFirstObject))
BOX_OFFSET_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossBoxOffset))
BACKGROUND_CLEANING_SPEC = HeadSpec(heads.Polygon, loss=_loss(PolygonLossCleansBackgroundNonfinite))


# Every catalogue check -> the mutant it must fail on, and a fragment of the message it must give there.
MUTANTS: dict[str, HeadSpec] = {
    "check_output_contract": CONTRACT_SPEC,
    "check_final_convs_initialised": R1_SPEC,
    "check_class_prior": R1_SPEC,
    "check_initial_cls_loss_bounded": R1_SPEC,
    "check_initial_predictions_sane": R2_SPEC,
    "check_every_parameter_gets_gradient": UNUSED_SPEC,
    "check_gradient_norm_bounded": PIXELS_SPEC,
    "check_finite_outputs_extreme_inputs": EXTREME_SPEC,
    "check_decode_consistency": R9_SPEC,
    "check_realistic_image_sizes": GRIDS_SPEC,
    "check_inference_deterministic": DROPOUT_SPEC,
    "check_forward_does_not_mutate_inputs": INPLACE_SPEC,
    "check_loss_rejects_nonfinite": R8_SPEC,
    "check_loss_all_background": R10_SPEC,
    "check_loss_batch_replication": R4_SPEC,
    "check_loss_batch_decomposition": R5_SPEC,
    "check_loss_target_order_invariant": ORDER_SPEC,
    "check_loss_finite_degenerate_targets": R6_SPEC,
    "check_loss_dtype_matrix": DTYPE_SPEC,
    "check_loss_pure": STATEFUL_SPEC,
    "check_gradients_finite_when_loss_finite": R7_SPEC,
    "check_assigner_coverage": R11_SPEC,
    "check_polygon_detection_terms_match": R3_SPEC,
    "check_polygon_gradient_at_init": R2_UNGUARDED_SPEC,
    "check_clipping_bounds_update": CLIP_SPEC,
    "check_skipped_step_leaves_model_finite": R0_SPEC,
    "check_training_canary": LR_SPEC,
    "check_loss_minimum_at_exact_fit": WRONG_STRIDE_SPEC,
    "check_loss_per_object_decomposition": AREA_BROADCAST_SPEC,
    "check_loss_matches_reference_family": BOX_OFFSET_SPEC,
}
MESSAGES: dict[str, str] = {
    "check_output_contract": "expected sigmoid probabilities",
    "check_final_convs_initialised": "was never set by bias_init()",
    "check_class_prior": "implies a class prior",
    "check_initial_cls_loss_bounded": "initial cls_loss item is",
    "check_initial_predictions_sane": "initial polygons are degenerate",
    "check_every_parameter_gets_gradient": "got no gradient (None)",
    "check_gradient_norm_bounded": "initial total gradient norm",
    "check_finite_outputs_extreme_inputs": "output is non-finite",
    "check_decode_consistency": "disagrees with the training decode",
    "check_realistic_image_sizes": "on a 672x704 px image",
    "check_inference_deterministic": "eval output changed on a repeated call",
    "check_forward_does_not_mutate_inputs": "in place",
    "check_loss_rejects_nonfinite": "a non-finite prediction must raise",
    "check_loss_all_background": "all-background batch is non-finite",
    "check_loss_batch_replication": "replicated",
    "check_loss_batch_decomposition": "swapping the two images",
    "check_loss_target_order_invariant": "reordering the objects",
    "check_loss_finite_degenerate_targets": "on degenerate targets",
    "check_loss_dtype_matrix": "neither work nor raise a clear error",
    "check_loss_pure": "different result on a repeated call",
    "check_gradients_finite_when_loss_finite": "but its gradient",
    "check_assigner_coverage": "the assigner starved it",
    "check_polygon_detection_terms_match": "detection terms differ",
    "check_polygon_gradient_at_init": "non-finite",
    "check_clipping_bounds_update": "clip_grad_norm_ over",
    "check_skipped_step_leaves_model_finite": "parameters/buffers are non-finite",
    "check_training_canary": "diverged",
    "check_loss_minimum_at_exact_fit": "at predictions that decode exactly onto the targets",
    "check_loss_per_object_decomposition": "differ from the mean of its",
    "check_loss_matches_reference_family": "differ from that family's reference loss",
}
# Checks that do not (yet) catch their mutant although the mutant shows the bug: check name -> what the check misses.
# The meta-test marks those cases xfail(strict=True), so a fixed check turns CI red until its entry is removed.
CHECK_GAPS: dict[str, str] = {}
# Checks the reference fails although it does not declare them: check name -> the reference bug they found.
REFERENCE_GAPS: dict[str, str] = {}


# ====================================================================================================== running checks
_SUBJECTS: dict[int, object] = {}
_OUTCOMES: dict[tuple[int, str], BaseException | None] = {}


def subject(spec: HeadSpec):
    """The subject of a module-level spec, built once per session (`build_head()` copies, so sharing is safe), from
    seed 0 as `headguard check` builds it: the same weights in every process, so a verdict never depends on which
    pytest-xdist worker builds it."""
    if id(spec) not in _SUBJECTS:
        with seeded(0):
            _SUBJECTS[id(spec)] = build_subject(spec, spec_name(spec))
    return _SUBJECTS[id(spec)]


def build_loss(spec: HeadSpec, head):
    """The spec's criterion for `head` (its own loss factory, else the subject's default for that head)."""
    return spec.loss(head) if spec.loss is not None else subject(spec).build_loss(head)


def spec_name(spec: HeadSpec) -> str:
    for name, value in globals().items():
        if value is spec:
            return f"mutants:{name}"
    return f"{getattr(spec.head, '__module__', '?')}:{getattr(spec.head, '__qualname__', repr(spec.head))}"


def check_outcome(spec: HeadSpec, check_name: str) -> BaseException | None:
    """Run one catalogue check on `spec` under the deterministic `ci` profile: None if it passed, else what it raised.

    Cached per (spec, check) for the session: the regression files and the meta-test ask the same questions.
    """
    import headguard.checks  # noqa: F401  (registers the catalogue)

    key = (id(spec), check_name)
    if key not in _OUTCOMES:
        try:
            CATALOGUE[check_name](subject(spec), CheckContext(profile="ci", seed=0))
        except Exception as err:  # noqa: BLE001  (CheckFailure is the expected finding; anything else is reported)
            _OUTCOMES[key] = err
        else:
            _OUTCOMES[key] = None
    return _OUTCOMES[key]


def failure_message(spec: HeadSpec, check_name: str) -> str:
    """The CheckFailure message of `check_name` on `spec`; raises AssertionError naming what happened otherwise."""
    outcome = check_outcome(spec, check_name)
    if not isinstance(outcome, CheckFailure):
        found = "it passed" if outcome is None else f"it raised {type(outcome).__name__}: {outcome}"
        raise AssertionError(f"{check_name} should fail on {spec_name(spec)} with a CheckFailure, but {found}")
    return outcome.message


def assert_passes(spec: HeadSpec, check_name: str) -> None:
    outcome = check_outcome(spec, check_name)
    if outcome is not None:
        raise AssertionError(
            f"{check_name} should pass on {spec_name(spec)}, but it raised {type(outcome).__name__}: {outcome}"
        )
