"""The fused kernels (`losses._kernels`): specs equal the reference on the CPU; kernels equal the specs on the GPU.

CPU (CI): each spec against the reference it replaces (`losses.assigner`, `heads._decode.dfl_expectation`,
`losses._boxes.dfl_loss`), bit for bit where the operation order is the same, else within 1e-6 relative; the
assigner's dense path (the metric spec, as accelerators run it) against its CPU path. The fast path that carries the
DFL kernels is held to the reference loss in tests/test_fast_paths.py.
GPU (`cuda` marker, skipped without CUDA or Triton): each Triton kernel against its spec on the same inputs (the
positives pass exactly, also at ties of overlap; the metrics against the float64 spec); the default loss (fast path,
graphs, kernels) against the eager reference (`cuda_graphs=False`), loss and whole gradient within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._inputs import STRIDES, loss_shape, make_batch, make_preds
from headguard.strategies import targets
from heads._decode import dfl_expectation as reference_expectation
from heads._decode import make_anchors
from losses import DetectionLoss, PolygonLoss
from heads._decode import dist2bbox
from losses._boxes import bbox2dist, bbox_ciou, dfl_loss
from losses._kernels import available, spec
from losses._kernels import dfl_expectation as fused_expectation
from losses.assigner import AssignerConfig, _anchors_in_boxes, _assign, _metrics
from tests._interpreter import interpreted_failures

EXPONENTS = [0.0, 0.3, 0.5, 1.0, 2.0, 3.0, 6.0]  # torch special-cases 0, 1, 0.5, 2, 3 in pow; the kernel must too
GPU_EXPONENTS = [0.5, 1.0, 3.0, 6.0]  # each (alpha, beta) pair is a kernel compilation: a few cover every branch
needs_kernels = pytest.mark.skipif(not available(), reason="needs Triton and a CUDA device")


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (0 where both are 0)."""
    scale = expected.double().norm().item()
    diff = (actual.double() - expected.double()).norm().item()
    return diff if scale == 0 else diff / scale


# ---------------------------------------------------------------------------------------------------- inputs
@st.composite
def assigner_inputs(draw, exponents=EXPONENTS):
    """The assigner's inputs for a small image: pixels, padded slots, tiny and degenerate boxes, scores in [0, 1]."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, n, nc = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 3, 80]))
    side = draw(st.sampled_from([32, 64, 96]))
    feats = [torch.zeros(1, 1, side // int(s), side // int(s)) for s in STRIDES]
    points, stride = make_anchors(feats, STRIDES)
    anchors = points * stride
    a = anchors.shape[0]
    # Predicted boxes around their anchors; some of zero width or height (degenerate, still finite).
    half = stride * 4 * torch.rand(b, a, 2, generator=gen) * (torch.rand(b, a, 2, generator=gen) > 0.1)
    pd_bboxes = torch.cat((anchors - half, anchors + half), -1)
    pd_scores = torch.rand(b, a, nc, generator=gen)
    pd_scores = torch.where(torch.rand(b, a, nc, generator=gen) < 0.05, torch.zeros(()), pd_scores)
    # Gts: centres anywhere, sizes from 0 (a point) to most of the image, so many sides fall below min_side.
    centre = side * torch.rand(b, n, 2, generator=gen)
    size = side * torch.rand(b, n, 2, generator=gen) ** 2 * (torch.rand(b, n, 2, generator=gen) > 0.1)
    gt_bboxes = torch.cat((centre - size / 2, centre + size / 2), -1)
    gt_labels = torch.randint(0, nc, (b, n, 1), generator=gen).float()
    mask_gt = torch.rand(b, n, 1, generator=gen) < 0.8
    gt_bboxes = torch.where(mask_gt, gt_bboxes, torch.zeros(()))  # padding slots are zeros, as pad_targets fills
    gt_labels = torch.where(mask_gt, gt_labels, torch.zeros(()))
    config = AssignerConfig(
        topk=draw(st.integers(1, 10)), alpha=draw(st.sampled_from(exponents)), beta=draw(st.sampled_from(exponents)),
        ensure_coverage=draw(st.booleans()),
    )
    return pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt, config


def _metric_args(pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt, config):
    return (pd_scores, pd_bboxes, anchors, gt_labels.long().squeeze(-1), gt_bboxes, mask_gt.squeeze(-1),
            STRIDES[1], config.alpha, config.beta)


@st.composite
def dfl_inputs(draw):
    """Logits (B, 4*R, A), an upstream gradient of the expectation, and positives with targets and gradients; the
    positives include repeated pairs of zero gradient (the fast path's filler entries)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, reg_max, a = draw(st.integers(1, 3)), draw(st.sampled_from([2, 7, 16])), draw(st.integers(1, 40))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    logits = spread * torch.randn(b, 4 * reg_max, a, generator=gen)
    grad = torch.randn(b, 4, a, generator=gen)
    k = draw(st.integers(0, 2 * b * a))
    flat = torch.randperm(b * a, generator=gen)[: min(k, b * a)]
    filler = torch.randint(0, b * a, (k - flat.numel(),), generator=gen)
    index = torch.cat((flat, filler))
    target = (reg_max + 1) * torch.rand(k, 4, generator=gen) - 0.5  # past both ends too: the clamp is part of it
    grad_pos = torch.cat((torch.randn(flat.numel(), generator=gen), torch.zeros(filler.numel())))
    return logits, grad, index // a, index % a, target, grad_pos, reg_max


def positive_box_case(seed: int, reg_max: int = 16):
    """Inputs of `spec.positive_boxes` on a small image: distances in [0, reg_max - 1] (some 0: degenerate boxes),
    distinct real positives with targets near, far from, disjoint from or exactly on (some coordinates, or all: the
    strides are powers of two, so pixels divided by them are exact) the predicted box, filler entries (whose indices
    may repeat a real one's), one-hot target scores."""
    gen = torch.Generator().manual_seed(seed)
    b, nc, side = 1 + seed % 3, (1, 3, 80)[seed % 3], (32, 64)[seed % 2]
    points, stride = make_anchors([torch.zeros(1, 1, side // int(s), side // int(s)) for s in STRIDES], STRIDES)
    a = points.shape[0]
    expectation = (reg_max - 1) * torch.rand(b, 4, a, generator=gen) * (torch.rand(b, 4, a, generator=gen) > 0.1)
    count = int(torch.randint(0, b * a // 2 + 1, (), generator=gen))
    index = torch.cat((torch.randperm(b * a, generator=gen)[:count], torch.arange(count, min(2 * count + 3, b * a))))
    valid = torch.arange(index.numel()) < count
    pred = torch.cat((points - expectation.transpose(1, 2)[..., :2], points + expectation.transpose(1, 2)[..., 2:]),
                     -1)  # (B, A, 4) grid units
    target = pred + 4 * torch.randn(b, a, 4, generator=gen) * (torch.rand(b, a, 1, generator=gen) < 0.8)
    target = torch.where(torch.rand(b, a, 4, generator=gen) < 0.2, pred, target)  # single coordinates tied
    target = torch.cat((torch.minimum(target[..., :2], target[..., 2:]), torch.maximum(target[..., :2],
                                                                                       target[..., 2:])), -1)
    target_bboxes = target * stride
    labels = torch.randint(0, nc, (b, a), generator=gen)
    norm = torch.rand(b, a, generator=gen) * (torch.rand(b, a, generator=gen) > 0.1)
    target_scores = torch.zeros(b, a, nc).scatter_(2, labels[..., None], norm[..., None])
    return expectation, points, stride, index, valid, target_bboxes, target_scores, reg_max


def _reference_positive_boxes(expectation, points, stride, index, valid, target_bboxes, target_scores, reg_max,
                              upstream):
    """The fast path's box term as it was before it was fused: (loss, weight, DFL targets, expectation gradient of
    <upstream, loss>) through autograd."""
    x = expectation.clone().requires_grad_()
    a = x.shape[2]
    image, anchor = index // a, index % a
    pred = dist2bbox(x.transpose(1, 2), points, xywh=False).reshape(-1, 4).index_select(0, index)
    target = torch.where(valid[:, None], target_bboxes[image, anchor] / stride[anchor], pred.detach())
    weight = torch.where(valid, target_scores[image, anchor].sum(-1), 0.0)
    loss = (1 - bbox_ciou(pred, target)) * weight
    (loss * upstream).sum().backward()
    return loss.detach(), weight, bbox2dist(points[anchor], target, reg_max - 1), x.grad


def _spec_positive_boxes(*case, upstream):
    parts = spec.positive_boxes(*case)
    grad = spec.positive_boxes_backward(parts.grad, upstream, case[3], case[4], case[0].shape)
    return parts.loss, parts.weight, parts.dfl_target, grad


# ---------------------------------------------------------------------------------------------------- specs (CPU)
@given(assigner_inputs())
def test_assign_metrics_spec_equals_reference(inputs):
    """Candidates, overlaps and metric of the spec are the reference's, bit for bit."""
    pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt, config = inputs
    candidate = _anchors_in_boxes(anchors, gt_bboxes, mask_gt, STRIDES[1]) & mask_gt
    overlaps, align = _metrics(pd_scores, pd_bboxes, gt_labels.long().squeeze(-1), gt_bboxes, candidate, config,
                               dense=True)
    got = spec.assign_metrics(*_metric_args(*inputs))
    for name, actual, expected in zip(("candidate", "overlaps", "align"), got, (candidate, overlaps, align)):
        assert torch.equal(actual, expected), f"{name}: spec differs from the reference by {_rel(actual, expected)}"


def _assign_both_ways(tensors, config):
    """(dense, sparse) assignments of the same inputs: the accelerators' fused-metric order and the CPU's nonzero."""
    pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt = tensors
    args = (pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt.bool(), STRIDES, config)
    return _assign(*args, dense=True), _assign(*args, dense=False)


@given(assigner_inputs())
def test_dense_assignment_equals_the_cpu_assignment(inputs):
    """The assignment over the fused metric (its spec here) is the CPU path's assignment: labels, boxes, masks and
    indices equal; target scores, a product and quotient of the metric computed in another order, within float32
    rounding (the randomised profile found 1-ulp differences, 7e-9, in 23 of 300 draws)."""
    *tensors, config = inputs
    dense, sparse = _assign_both_ways(tensors, config)
    assert dense.num_classes == sparse.num_classes
    for name, actual, want in zip(sparse._fields[:-1], dense, sparse):
        if name == "target_score":
            torch.testing.assert_close(actual, want, rtol=1e-6, atol=1e-7, msg=f"{name} differs beyond rounding")
        else:
            assert torch.equal(actual, want), f"{name} differs from the CPU path's assignment"


def test_dense_assignment_keeps_reference_edge_cases():
    """No gt slots gives the empty assignment; fewer anchors than topk raises the reference's error."""
    pd_scores, pd_bboxes = torch.rand(2, 5, 3), torch.rand(2, 5, 4)
    anchors = torch.rand(5, 2)
    empty = _assign_both_ways((pd_scores, pd_bboxes, anchors, torch.zeros(2, 0, 1), torch.zeros(2, 0, 4),
                               torch.zeros(2, 0, 1)), AssignerConfig())[0]
    assert not empty.fg_mask.any()
    with pytest.raises(ValueError, match="expected at least topk"):
        _assign_both_ways((pd_scores, pd_bboxes, anchors, torch.zeros(2, 1, 1), torch.ones(2, 1, 4),
                           torch.ones(2, 1, 1)), AssignerConfig())


def _reference_dfl(logits, grad, image, anchor, target, grad_pos, reg_max):
    """Value and logits gradient of <grad, E> + <grad_pos, dfl_loss at positives>, through the reference."""
    x = logits.clone().requires_grad_()
    expectation = reference_expectation(x, reg_max)
    b, _, a = x.shape
    positive = dfl_loss(x.view(b, 4, reg_max, a)[image, :, :, anchor], target)
    ((expectation * grad).sum() + (positive * grad_pos).sum()).backward()
    return expectation.detach(), positive.detach(), x.grad


def _fused_dfl(logits, grad, image, anchor, target, grad_pos, reg_max):
    x = logits.clone().requires_grad_()
    branch = fused_expectation(x, reg_max)
    positive = branch.positive_loss(image, anchor, target)
    ((branch.expectation * grad).sum() + (positive * grad_pos).sum()).backward()
    return branch.expectation.detach(), positive.detach(), x.grad


def _float64(inputs):
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


@given(dfl_inputs())
def test_dfl_spec_equals_reference(inputs):
    """Expectation and positive DFL agree with the reference within 1e-6. The dense logits gradient is held to the
    exact one (the reference in float64): within 2e-5 relative, or twice the float32 reference's own error where that
    is larger. It is ill-conditioned where one bin dominates, (bin - E) cancelling, so two float32 computations in
    different orders differ by up to 1e-4 there (measured over 1000 random draws: the reference 7.5e-5 off, the spec
    5.4e-5), and a plain comparison of the two would only measure their rounding. (The fuzz profile's search found
    the spec 1.2e-5 off where the reference is 2.8e-6 off.)"""
    fused, reference, exact = _fused_dfl(*inputs), _reference_dfl(*inputs), _reference_dfl(*_float64(inputs))
    for name, actual, expected in zip(("expectation", "positive DFL"), fused, reference):
        assert _rel(actual, expected) <= 1e-6, f"{name}: relative difference {_rel(actual, expected):.2e} > 1e-6"
    error, own_error = _rel(fused[2], exact[2]), _rel(reference[2], exact[2])
    assert error <= max(2e-5, 2 * own_error), (f"logits gradient: {error:.2e} off the float64 gradient (the float32 "
                                                f"reference {own_error:.2e})")


@st.composite
def box_pairs(draw):
    """xyxy box pairs (N, 4) in float64: overlapping, nested, disjoint, degenerate (zero width or height) and with
    coordinates tied between the two boxes (each coordinate, or the whole box)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = 256
    corner = 10 * torch.rand(2, n, 2, generator=gen, dtype=torch.float64)
    size = 6 * torch.rand(2, n, 2, generator=gen, dtype=torch.float64) * (torch.rand(2, n, 2, generator=gen) > 0.1)
    box1, box2 = torch.cat((corner, corner + size), -1).unbind(0)
    tie = torch.rand(n, 4, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return torch.where(tie, box2, box1), box2


@given(box_pairs())
def test_ciou_gradient_equals_autograd_of_bbox_ciou(boxes):
    """`spec.ciou_parts` is `bbox_ciou` bit for bit, and `spec.ciou_gradient` its autograd gradient (float64, within
    1e-12 of the largest), at ties too: torch.minimum / maximum split the gradient there, the clamp passes it at 0."""
    box1, box2 = boxes
    x = box1.clone().requires_grad_()
    value = bbox_ciou(x, box2)
    value.sum().backward()
    parts = spec.ciou_parts(box1, box2)
    assert torch.equal(parts.ciou, value.detach()), "ciou_parts differs from bbox_ciou"
    grad = torch.stack(spec.ciou_gradient(parts), -1)
    error = (grad - x.grad).abs().max().item() / x.grad.abs().max().item()
    assert error <= 1e-12, f"CIoU gradient {error:.2e} (of the largest) off autograd's"


def _gradient_error(actual: torch.Tensor, expected: torch.Tensor, weight: torch.Tensor) -> float:
    """||actual - expected|| relative to ||expected||, or to ||weight|| where that is larger: every positive's
    gradient is weight times a box-size term of order 1, so near an exact fit (gradient 0) the weights set the scale."""
    scale = max(expected.double().norm().item(), weight.double().norm().item())
    diff = (actual.double() - expected.double()).norm().item()
    return diff if scale == 0 else diff / scale


@given(st.integers(0, 2**31 - 1))
def test_positive_boxes_spec_equals_reference(seed):
    """The fused box term's spec against the computation it replaced (autograd through `bbox_ciou`): loss, weights
    and DFL targets bit for bit (same operations), in float32 and float64. The expectation's gradient in float64
    within 1e-12; in float32 held to the float64 gradient, within 1e-5 or twice the float32 reference's own error:
    CIoU's gradient is ill-conditioned at degenerate boxes, where the two float32 computations differ by up to 1e-5
    (measured over 1000 seeds) while each is as far from the float64 one (up to 0.2)."""
    case = positive_box_case(seed)
    upstream = torch.randn(case[3].numel(), generator=torch.Generator().manual_seed(seed))
    got, want = _spec_positive_boxes(*case, upstream=upstream), _reference_positive_boxes(*case, upstream)
    got64 = _spec_positive_boxes(*_float64(case), upstream=upstream.double())
    exact = _reference_positive_boxes(*_float64(case), upstream.double())
    for precision, actual_parts, expected_parts in (("float32", got, want), ("float64", got64, exact)):
        for name, actual, expected in zip(("loss", "weight", "DFL target"), actual_parts, expected_parts):
            assert torch.equal(actual, expected), f"{precision} {name}: spec differs by {_rel(actual, expected)}"
    error64 = _gradient_error(got64[3], exact[3], exact[1])
    assert error64 <= 1e-12, f"float64 expectation gradient: {error64:.2e} off autograd's"
    error, own_error = _gradient_error(got[3], exact[3], exact[1]), _gradient_error(want[3], exact[3], exact[1])
    assert error <= max(1e-5, 2 * own_error), (f"float32 expectation gradient: {error:.2e} off the float64 one (the "
                                               f"float32 reference {own_error:.2e})")


def test_dfl_expectation_rejects_wrong_channels():
    with pytest.raises(ValueError, match="expected 4 \\* reg_max = 64"):
        fused_expectation(torch.zeros(1, 60, 5), 16)


def test_kernels_unavailable_on_cpu_tensors():
    """CPU tensors (and float64) never reach the kernels: the specs run and say so."""
    assert not available(torch.zeros(1))
    assert not available(torch.zeros(1, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------------- loss path
NC_LOSS = 3


@st.composite
def loss_batches(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, side = draw(st.integers(1, 3)), draw(st.sampled_from([64, 96]))
    feats = [torch.zeros(()).expand(b, 8, side // int(s), side // int(s)) for s in STRIDES]
    a = sum(f.shape[2] * f.shape[3] for f in feats)
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    preds = {
        "boxes": spread * torch.randn(b, 64, a, generator=gen),
        "scores": spread * torch.randn(b, NC_LOSS, a, generator=gen) - 2.0,
        "polygons": 0.5 * torch.randn(b, 12, a, generator=gen),
        "feats": feats,
    }
    batch = draw(targets(NC_LOSS, batch_size=b, num_vertices=6, max_objects=10))
    return preds, batch


def _loss_and_grads(criterion, preds, batch, device):
    """The loss components and the gradient of their sum for each prediction that receives one (name -> tensor)."""
    leaves = {k: v.to(device).requires_grad_() for k, v in preds.items() if k != "feats"}
    inputs = {**leaves, "feats": [f.to(device) for f in preds["feats"]]}
    loss, _ = criterion(inputs, {k: v.to(device) for k, v in batch.items()})
    loss.sum().backward()
    return loss.detach(), {k: leaf.grad for k, leaf in leaves.items() if leaf.grad is not None}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def _check_loss_path(preds, batch, device, tol=1e-5):
    """The fast path (the default on CUDA; asked for on the CPU, where its core runs eagerly on the kernels' specs)
    against the eager reference (`cuda_graphs=False`).

    The loss components are compared as one vector and so is the gradient of their sum over all predictions: the
    error that matters is relative to the whole gradient. Per prediction it is not meaningful where a term is
    negligible. Measured on an H200: with wild predictions the box and DFL terms were 2e-20 (classification 62),
    their alignment metrics near-tied at the top-k boundary, and one ulp between the CUDA metric kernel and torch
    swapped a positive. The box gradient moved by 5.5e-5 of its own norm, which is 1e-20 of the loss."""
    fast = None if device == "cuda" else True
    for mode, reference, fused in (
        ("detection", DetectionLoss(NC_LOSS, STRIDES, cuda_graphs=False), DetectionLoss(NC_LOSS, STRIDES,
                                                                                        cuda_graphs=fast)),
        ("mgiou", PolygonLoss(NC_LOSS, STRIDES, np=6, mode="mgiou", cuda_graphs=False),
         PolygonLoss(NC_LOSS, STRIDES, np=6, mode="mgiou", cuda_graphs=fast)),
    ):
        want_loss, want_grads = _loss_and_grads(reference, preds, batch, device)
        loss, grads = _loss_and_grads(fused, preds, batch, device)
        assert _rel(loss, want_loss) <= tol, f"{mode}: loss relative difference {_rel(loss, want_loss):.2e}"
        assert grads.keys() == want_grads.keys(), f"{mode}: gradients of {sorted(grads)}; expected {sorted(want_grads)}"
        error = _rel(_flat(grads), _flat(want_grads))
        by_name = {k: f"{_rel(grads[k], want_grads[k]):.1e}" for k in grads}
        assert error <= tol, f"{mode}: gradient relative difference {error:.2e} (per prediction: {by_name})"


@given(loss_batches())
def test_kernel_loss_path_equals_reference(case):
    """The fast path with the fused kernels in its core (their specs on the CPU) equals the reference within 1e-5."""
    _check_loss_path(*case, "cpu")


# ---------------------------------------------------------------------------------------------------- kernels (GPU)
def _cuda(tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


def assign_metrics_kernel_failures(args) -> list[str]:
    """The metrics kernel against its spec on the arguments' device (`_metric_args`): candidates exactly, overlaps
    against the float64 spec, align against s^alpha * overlap^beta of the kernel's own overlaps."""
    from losses._kernels import _triton

    expected, exact = spec.assign_metrics(*args), spec.assign_metrics(*_float64(args))
    candidate, overlaps, align = _triton.assign_metrics(*args)
    if not torch.equal(candidate, expected[0]):
        return ["candidate masks differ"]
    failures = []
    # CIoU is IoU minus penalties, each of order 1, and can cancel down to 1e-4 or less: an error relative to the
    # result is meaningless there (the float32 spec itself was 2e-6 off float64, the kernel 4e-6, both a few ulps
    # of the terms). So the overlaps are held to the float64 spec absolutely, at about 16 ulps of 1...
    overlap_error = (overlaps.double() - exact[1]).abs().max().item()
    if overlap_error > 1e-6:
        failures.append(f"overlaps: {overlap_error:.2e} off the float64 spec")
    # ... and align = s^alpha * overlap^beta is checked on the kernel's own overlaps (at a small overlap, beta < 1
    # magnifies any overlap error without bound).
    pd_scores, _, _, labels, _, _, _, alpha, beta = _float64(args)
    want = spec.alignment(pd_scores, labels, candidate, overlaps.double(), alpha, beta)
    if _rel(align, want) > 1e-5:
        failures.append(f"align: relative difference {_rel(align, want):.2e} from s^alpha * overlap^beta")
    return failures


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(assigner_inputs(exponents=GPU_EXPONENTS))
def test_assign_metrics_kernel_equals_spec(inputs):
    assert assign_metrics_kernel_failures(_cuda(_metric_args(*inputs))) == []


def top_indices_failures(align: torch.Tensor, mask_gt: torch.Tensor, topk: int) -> list[str]:
    """The top-k kernel picks per row the anchors `spec.top_indices` picks (as a set: ties to the lowest index; zeros
    on padding rows), and on real rows their values are torch.topk's (so it changes only which of equally scored
    anchors are picked)."""
    from losses._kernels import _triton

    got = _triton.top_indices(align, mask_gt, topk).sort(-1).values
    if not torch.equal(got, spec.top_indices(align, mask_gt, topk).sort(-1).values):
        return ["top-k kernel picks other anchors than the spec"]
    values = align.gather(-1, got).sort(-1).values[mask_gt]
    if not torch.equal(values, align.topk(topk, dim=-1).values.sort(-1).values[mask_gt]):
        return ["top-k kernel picks other values than torch.topk"]
    return []


def top_picks_stay_in_their_rows() -> list[str]:
    """A row of negative NaNs (keys below the padding lanes') shorter than its block: the top-k kernel marks at most
    topk anchors of the row itself, none in the padding row after it."""
    from losses._kernels import _triton

    align = torch.full((1, 2, 20), -float("nan"))
    picked = _triton.top_picks(align, torch.tensor([[True, False]]), 10)
    failures = []
    if picked[0, 1].any():
        failures.append("top-k kernel marked anchors past its row")
    if int(picked[0, 0].sum()) > 10:
        failures.append(f"top-k kernel marked {int(picked[0, 0].sum())} anchors of a row; expected at most 10")
    return failures


def class_bce_case(seed: int, b: int = 3, nc: int = 5, a: int = 1500):
    """Logits (B, nc, A) from -30 to 30 (float32: exp overflows nowhere, log1p's argument spans 1e-13 to 1), each
    anchor's class (background: an out-of-range class with score 0, as the assigner's empty case) and score, and a
    0-d upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(b, nc, a, generator=g) * 60 - 30) * torch.rand(b, 1, a, generator=g)
    labels = torch.randint(0, nc + 1, (b, a), generator=g)
    score = torch.where(labels < nc, torch.rand(b, a, generator=g), 0.0)
    return logits, labels, score, torch.rand((), generator=g) + 0.5


def class_bce_kernel_failures(logits, labels, score, grad) -> list[str]:
    """The class-term kernels against the spec on the case's device: the sum within 1e-6 relative (another
    summation order), the gradient within 1e-6 of its largest entry."""
    from losses._kernels import _triton

    pairs = ((_triton.class_bce(logits, labels, score), spec.class_bce(logits, labels, score)),
             (_triton.class_bce_backward(logits, labels, score, grad),
              spec.class_bce_backward(logits, labels, score, grad)))
    return [f"class term {name}: kernel differs from the spec by {_rel(actual, want):.2e}"
            for name, (actual, want) in zip(("sum", "gradient"), pairs) if _rel(actual, want) > 1e-6]


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(st.integers(0, 2**31 - 1), st.integers(1, 80), st.integers(1, 9000))
def test_class_bce_kernels_equal_spec(seed, nc, a):
    assert class_bce_kernel_failures(*_cuda(class_bce_case(seed, b=2, nc=nc, a=a))) == []


@settings(max_examples=30)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_class_bce_spec_equals_reference(seed, dtype):
    """The spec's sum and gradient from (class, score) per anchor equal torch's BCE with logits against the dense
    (B, A, nc) targets the reference path builds (zeros, the score scattered at the class)."""
    logits, labels, score, grad = class_bce_case(seed, a=200)
    logits, score = logits.to(dtype).requires_grad_(), score.to(dtype)
    nc = logits.shape[1]
    dense = torch.zeros(*labels.shape, nc + 1, dtype=dtype).scatter_(2, labels[..., None], score[..., None])[..., :nc]
    want = F.binary_cross_entropy_with_logits(logits.transpose(1, 2), dense, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * grad.to(dtype), logits)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert _rel(spec.class_bce(logits, labels, score), want) <= tol
    assert _rel(spec.class_bce_backward(logits.detach(), labels, score, grad.to(dtype)), want_grad) <= tol


def _tied_metrics(args):
    """The metrics of `_metric_args`, rounded to eighths (ties between anchors, also among non-zero metrics)."""
    candidate, overlaps, align = spec.assign_metrics(*args)
    return candidate, torch.where(candidate, (overlaps * 4).round() / 4, 0.0), (align * 8).round() / 8


def positives_kernel_failures(candidate, overlaps, align, mask_gt, topk: int) -> list[str]:
    """The top-k marks equal `spec.top_indices`' picks on real rows and are 0 on padding rows; the positives pass over
    those marks equals `spec.positives_from_picks` exactly (conflicts resolved to the first gt of highest overlap)."""
    from losses._kernels import _triton

    picked = _triton.top_picks(align, mask_gt, topk)
    want = torch.zeros_like(picked).scatter_(-1, spec.top_indices(align, mask_gt, topk), 1) * mask_gt[..., None]
    if not torch.equal(picked, want):
        return ["top-k marks differ from the spec's picks"]
    expected = spec.positives_from_picks(picked, candidate, overlaps, align)
    got = _triton.positives_from_picks(picked, candidate, overlaps, align)
    return [f"{name}: positives pass differs from the spec" for name, actual, want in zip(expected._fields, got,
                                                                                          expected)
            if not torch.equal(actual, want)]


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(assigner_inputs(exponents=GPU_EXPONENTS), st.booleans())
def test_assign_positives_kernels_equal_spec(inputs, tied):
    """The top-k marks and the positives pass equal their specs exactly, also where overlaps tie between gts (`tied`:
    overlaps rounded to quarters, so conflict resolution meets ties and must keep the first gt, as torch's max) and
    metrics tie between anchors (rounded to eighths; also the many tied zero metrics of a gt with fewer than top-k
    candidates)."""
    args = _cuda(_metric_args(*inputs))
    candidate, overlaps, align = _tied_metrics(args) if tied else spec.assign_metrics(*args)
    assert positives_kernel_failures(candidate, overlaps, align, args[5], inputs[-1].topk) == []


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(assigner_inputs(exponents=GPU_EXPONENTS), st.booleans())
def test_top_indices_kernel_equals_spec(inputs, tied):
    args = _cuda(_metric_args(*inputs))
    align = (_tied_metrics(args) if tied else spec.assign_metrics(*args))[2]
    assert top_indices_failures(align, args[5], inputs[-1].topk) == []


def test_top_indices_kernel_at_benchmark_rows():
    """The benchmark's row length (8400 anchors: a 16384-lane block) with many ties, negative zeros among them, and
    padding rows, under the interpreter: picks of `spec.top_indices`, values of torch.topk; and a row of negative
    NaNs keeps its marks inside the row."""
    code = ("import json, torch, tests.test_kernels as t; "
            "g = torch.Generator().manual_seed(0); "
            "align = (torch.rand(2, 3, 8400, generator=g) * (torch.rand(2, 3, 8400, generator=g) < 0.02) * 8).round(); "
            "align[..., 3:9] = -0.0; "  # negative zeros tie with zeros, as in torch's comparisons
            "real = torch.tensor([[True, True, False], [True, False, False]]); "
            "print(json.dumps(t.top_indices_failures(align, real, 10) "
            "+ t.top_indices_failures(align[:, :, :20], real, 10) + t.top_picks_stay_in_their_rows()))")
    assert interpreted_failures(code) == []


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(dfl_inputs())
def test_dfl_kernels_equal_spec(inputs):
    from losses._kernels import _triton

    logits, grad, image, anchor, target, grad_pos, reg_max = _cuda(inputs)
    x = logits.view(logits.shape[0], 4, reg_max, -1)
    pairs = [
        (_triton.expectation_forward(x), spec.expectation_forward(x)),
        (_triton.expectation_backward(x, spec.expectation_forward(x), grad),
         spec.expectation_backward(x, spec.expectation_forward(x), grad)),
        (_triton.positive_dfl_forward(x, image, anchor, target), spec.positive_dfl_forward(x, image, anchor, target)),
        (_triton.positive_dfl_backward_add(torch.ones_like(x), x, image, anchor, target, grad_pos),
         spec.positive_dfl_backward_add(torch.ones_like(x), x, image, anchor, target, grad_pos)),
    ]
    for name, (actual, want) in zip(("expectation", "its gradient", "positive DFL", "its gradient"), pairs):
        assert _rel(actual, want) <= 1e-6, f"{name}: relative difference {_rel(actual, want):.2e}"


def positive_boxes_kernel_failures(case, upstream) -> list[str]:
    """The Triton box-term kernels against the spec on the case's device: weights and DFL targets bit for bit (sums of
    one-hot scores; divisions rounded to nearest); loss within 1e-6 absolute of the float32 spec (weight * (1 - CIoU),
    CIoU's terms of order 1, atan's last bit may differ). Not of the float64 one: float32 corners already carry the
    error (seed 39691 on an H200: a box 0.0022 wide at x = 2.5 has its width 1e-4 off, and the float32 spec's loss is
    5.1e-5 off float64's, as the kernel's). The expectation gradient is held to the float64 spec as the spec is held
    to autograd (`test_positive_boxes_spec_equals_reference`)."""
    from losses._kernels import _triton

    parts = _triton.positive_boxes(*case)
    grad = _triton.positive_boxes_backward(parts.grad, upstream, case[3], case[4], case[0].shape)
    got = (parts.loss, parts.weight, parts.dfl_target, grad)
    want = _spec_positive_boxes(*case, upstream=upstream)
    exact = _spec_positive_boxes(*_float64(case), upstream=upstream.double())
    failures = [f"{name}: kernel differs from the spec by {_rel(actual, expected):.2e}"
                for name, actual, expected in zip(("weight", "DFL target"), got[1:3], want[1:3])
                if not torch.equal(actual, expected)]
    loss_error = (got[0].double() - want[0].double()).abs().max().item() if got[0].numel() else 0.0
    if loss_error > 1e-6:
        failures.append(f"loss: {loss_error:.2e} off the spec")
    error, own_error = _gradient_error(got[3], exact[3], exact[1]), _gradient_error(want[3], exact[3], exact[1])
    if error > max(1e-5, 2 * own_error):
        failures.append(f"expectation gradient: {error:.2e} off the float64 spec (the float32 spec {own_error:.2e})")
    return failures


def _interpreter_libdevice() -> None:
    """Give Triton's interpreter (which runs numpy on the tensors' data and has no libdevice) the libdevice functions
    the kernels call, as numpy's: atan, pow, exp and log1p round within the tolerances of the kernels' checks."""
    import numpy as np
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.interpreter import TensorHandle

    def numpy_op(op):
        def run(*args, _semantic=None):
            data = op(*(a.handle.data for a in args))
            return tl.tensor(TensorHandle(data.astype(args[0].handle.data.dtype), args[0].handle.dtype.scalar),
                             args[0].type)
        return run

    libdevice.atan, libdevice.pow = numpy_op(np.arctan), numpy_op(np.power)
    libdevice.exp, libdevice.log1p = numpy_op(np.exp), numpy_op(np.log1p)


def interpreted_kernel_failures(examples: int = 12) -> list[str]:
    """Run in a process with TRITON_INTERPRET=1: the box-term, metric, top-k and class-term kernels against their specs
    on CPU tensors (fixed cases: seeds for the box and class terms, a derandomised Hypothesis run for the
    assignment's)."""
    _interpreter_libdevice()
    failures = []
    for seed in range(examples):
        case = positive_box_case(seed)
        upstream = torch.randn(case[3].numel(), generator=torch.Generator().manual_seed(seed))
        failures += [f"box term, seed {seed}: {failure}" for failure in positive_boxes_kernel_failures(case, upstream)]

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None)
    @given(assigner_inputs(exponents=GPU_EXPONENTS), st.booleans())
    def metrics(inputs, tied):
        args = _metric_args(*inputs)
        failures.extend(f"metrics: {failure}" for failure in assign_metrics_kernel_failures(args))
        candidate, overlaps, align = _tied_metrics(args) if tied else spec.assign_metrics(*args)
        failures.extend(f"top-k: {failure}" for failure in top_indices_failures(align, args[5], inputs[-1].topk))
        failures.extend(f"positives: {failure}"
                        for failure in positives_kernel_failures(candidate, overlaps, align, args[5], inputs[-1].topk))

    metrics()
    for seed in range(3):
        failures += class_bce_kernel_failures(*class_bce_case(seed))
    return failures


def test_kernels_equal_specs_under_the_interpreter():
    """CI has no GPU: Triton's CPU interpreter runs the box-term kernels (their arithmetic, masks, filler entries and
    ties), the metrics kernel (its tiles without candidates too), the top-k kernels, the positives pass (ties too)
    and the class-term kernels against their specs."""
    code = "import json, tests.test_kernels as t; print(json.dumps(t.interpreted_kernel_failures()))"
    assert interpreted_failures(code) == []


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(st.integers(0, 2**31 - 1))
def test_positive_boxes_kernel_equals_spec(seed):
    case = _cuda(positive_box_case(seed))
    upstream = torch.randn(case[3].numel(), generator=torch.Generator().manual_seed(seed)).cuda()
    assert positive_boxes_kernel_failures(case, upstream) == []


@pytest.mark.cuda
@needs_kernels
@settings(max_examples=100)
@given(loss_batches())
def test_kernel_loss_path_equals_reference_on_gpu(case):
    """The default loss (fast path, graphs, Triton kernels) equals the eager reference within 1e-5."""
    _check_loss_path(*case, "cuda")


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("shape_name", ["a", "b"])
def test_kernel_loss_path_at_benchmark_shapes(shape_name):
    """At the benchmark shapes, the default (CUDA graphs, Triton kernels): within 1e-5 of the eager reference."""
    shape = loss_shape(shape_name, "cuda")
    results = []
    default = DetectionLoss(shape.nc, STRIDES)
    for criterion in (DetectionLoss(shape.nc, STRIDES, cuda_graphs=False), default):
        preds, batch = make_preds(shape, "cuda"), make_batch(shape, "cuda")
        for _ in range(2):  # the second call replays the captured graphs
            for v in preds.values():
                if isinstance(v, torch.Tensor):
                    v.grad = None
            loss, _ = criterion(preds, batch)
            loss.sum().backward()
        results.append([loss.detach(), preds["boxes"].grad, preds["scores"].grad])
    assert default._fast is not None and default._fast.core.disabled_reason is None, "the default did not capture"
    for i, (actual, want) in enumerate(zip(*reversed(results))):
        assert _rel(actual, want) <= 1e-5, f"output {i}: relative difference {_rel(actual, want):.2e}"
