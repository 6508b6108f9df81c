"""Triton kernels with the signatures and operation order of `losses._kernels.spec` (float32, CUDA tensors).

Importing this module needs Triton; `losses._kernels` imports it behind a guard. Every kernel is launched with
`enable_fp_fusion=False`, divisions are round-to-nearest (`div_rn`) and exp/log/atan/pow are libdevice's, so that the
arithmetic rounds as torch's one-op-at-a-time kernels do: on an H200 the candidate mask equals the spec's and 99.7 %
of the metrics are bit-equal, the rest within two ulps (tests/test_kernels.py; docs/benchmarks.md). The MGIoU kernel's
loss equals `spec.mgiou_forward`'s bit for bit under Triton's interpreter (its gradients sum in another order: within
5e-7 of the largest but at stationary points, where both are rounding noise) and within 1e-6 / 1e-5 (value /
gradient) on the GPU (tests/test_mgiou_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import spec
from ._launch import DirectLaunch
from .spec import (
    ASPECT_GAIN,
    BOX_EPS,
    INSIDE_EPS,
    MGIOU_EDGE_EPS,
    MGIOU_PRED_EMPTY,
    MGIOU_PRED_NONFINITE,
    MGIOU_SPREAD_EPS,
    MGIOU_TARGET_EMPTY,
    MGIOU_TARGET_NONFINITE,
)

_EXACT = {"enable_fp_fusion": False}
# The MGIoU problem bits, as constants a kernel may read.
_PRED_NONFINITE = tl.constexpr(MGIOU_PRED_NONFINITE)
_TARGET_NONFINITE = tl.constexpr(MGIOU_TARGET_NONFINITE)
_PRED_EMPTY = tl.constexpr(MGIOU_PRED_EMPTY)
_TARGET_EMPTY = tl.constexpr(MGIOU_TARGET_EMPTY)
_PAIR_BLOCK_N = 4  # gts per tile: few, so most tiles hold no candidate (37 us against 112 for 16 at shape (a))
_PAIR_BLOCK_A = 128
_BIN_BLOCK_A = 128
_POS_BLOCK_K = 32
_BOX_BLOCK_K = 128
_POSITIVES_BLOCK_A = 256
_TOP_BLOCK_MAX = 16384  # longest row the top-k kernel holds in registers
_TOP_MAX_WARPS = 16  # 16384 anchors: 32 per thread (8, 16 and 32 warps measured: 16 the fastest)
# (pairs per program, warps) of the MGIoU kernel: one thread per pair (its vertex reductions in that thread's
# registers) in 1-warp programs once 64-pair programs would fill the SMs, else 64 pairs over 4 warps (two threads per
# pair, more work per SM). H200, `benchmarks/mgiou_kernel_time.py`, with gradients, against 64 pairs over 4 warps
# throughout: 1M x 8 pairs 1098 -> 735 us, 100k x 4 54 -> 24 us; 4200 x 8 (66 programs) 47 us, 51 with (32, 1).
_MGIOU_FULL, _MGIOU_FEW = (32, 1), (64, 4)
_MGIOU_PROBLEMS_BLOCK = 256  # pairs per program of the problem check (4 warps; it reads each vertex once)
_SM_COUNTS: dict[int, int] = {}  # device index -> streaming multiprocessors
_CLASS_BLOCK_A = 1024  # anchors per program of the class term


@triton.jit
def _pow(x, e: tl.constexpr):
    """x ** e for a constant e, with torch's special cases (0, 1, 0.5, 2, 3 are not computed through powf)."""
    if e == 0.0:
        y = tl.full(x.shape, 1.0, tl.float32)
    elif e == 1.0:
        y = x
    elif e == 0.5:
        y = tl.sqrt_rn(x)
    elif e == 2.0:
        y = x * x
    elif e == 3.0:
        y = x * x * x
    else:
        y = libdevice.pow(x, tl.full(x.shape, e, tl.float32))
    return y


@DirectLaunch
@triton.jit
def _assign_metrics_kernel(
    scores_ptr, s_sb, s_sa, s_sc,
    pd_ptr, s_pb, s_pa, s_pk,
    anchor_ptr, s_aa, s_ak,
    label_ptr, gt_ptr, real_ptr,
    cand_ptr, overlap_ptr, align_ptr,
    n, A, min_side,
    ALPHA: tl.constexpr, BETA: tl.constexpr, INSIDE: tl.constexpr, EPS: tl.constexpr, GAIN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
):
    b = tl.program_id(2)
    gi = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ai = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    g_ok = gi < n
    a_ok = ai < A
    b64 = b.to(tl.int64)

    # Per gt (BLOCK_N,): its box, label, whether it is real, the enlarged box and its aspect angle.
    slot = b64 * n + gi
    gx1 = tl.load(gt_ptr + slot * 4 + 0, mask=g_ok, other=0.0)
    gy1 = tl.load(gt_ptr + slot * 4 + 1, mask=g_ok, other=0.0)
    gx2 = tl.load(gt_ptr + slot * 4 + 2, mask=g_ok, other=0.0)
    gy2 = tl.load(gt_ptr + slot * 4 + 3, mask=g_ok, other=0.0)
    real = tl.load(real_ptr + slot, mask=g_ok, other=0) != 0
    label = tl.load(label_ptr + slot, mask=g_ok, other=0)
    cx = (gx1 + gx2) * 0.5
    cy = (gy1 + gy2) * 0.5
    w = gx2 - gx1
    h = gy2 - gy1
    w = tl.where((w < min_side) & real, min_side, w)
    h = tl.where((h < min_side) & real, min_side, h)
    half_w = w * 0.5
    half_h = h * 0.5
    ex1 = cx - half_w
    ey1 = cy - half_h
    ex2 = cx + half_w
    ey2 = cy + half_h

    # Per anchor (BLOCK_A,): its point.
    x = tl.load(anchor_ptr + ai * s_aa, mask=a_ok, other=0.0)
    y = tl.load(anchor_ptr + ai * s_aa + s_ak, mask=a_ok, other=0.0)

    # Pairs (BLOCK_N, BLOCK_A).
    inside = (
        ((x[None, :] - ex1[:, None]) > INSIDE) & ((y[None, :] - ey1[:, None]) > INSIDE)
        & ((ex2[:, None] - x[None, :]) > INSIDE) & ((ey2[:, None] - y[None, :]) > INSIDE)
    )
    pair_ok = g_ok[:, None] & a_ok[None, :]
    candidate = inside & real[:, None] & pair_ok
    out = (b64 * n + gi[:, None]) * A + ai[None, :]
    tl.store(cand_ptr + out, candidate.to(tl.int8), mask=pair_ok)
    if tl.max(tl.max(candidate.to(tl.int32), 1), 0) == 0:
        # Most tiles hold no candidate (a gt covers a few anchor rows): their metrics are exactly 0, as the spec's.
        tl.store(overlap_ptr + out, tl.zeros((BLOCK_N, BLOCK_A), tl.float32), mask=pair_ok)
        tl.store(align_ptr + out, tl.zeros((BLOCK_N, BLOCK_A), tl.float32), mask=pair_ok)
    else:
        _assign_metrics_tile(scores_ptr, s_sb, s_sa, s_sc, pd_ptr, s_pb, s_pa, s_pk, overlap_ptr, align_ptr, b64, ai,
                             a_ok, gx1, gy1, gx2, gy2, label, candidate, pair_ok, out, ALPHA, BETA, EPS, GAIN)


@triton.jit
def _assign_metrics_tile(scores_ptr, s_sb, s_sa, s_sc, pd_ptr, s_pb, s_pa, s_pk, overlap_ptr, align_ptr, b64, ai, a_ok,
                         gx1, gy1, gx2, gy2, label, candidate, pair_ok, out, ALPHA: tl.constexpr, BETA: tl.constexpr,
                         EPS: tl.constexpr, GAIN: tl.constexpr):
    """CIoU overlaps and metrics of a tile of pairs with a candidate among them."""
    aw = gx2 - gx1
    ah = gy2 - gy1 + EPS
    g_angle = libdevice.atan(tl.math.div_rn(aw, ah))
    # Per anchor: the predicted box and its aspect angle.
    pd = pd_ptr + b64 * s_pb + ai * s_pa
    px1 = tl.load(pd, mask=a_ok, other=0.0)
    py1 = tl.load(pd + s_pk, mask=a_ok, other=0.0)
    px2 = tl.load(pd + 2 * s_pk, mask=a_ok, other=0.0)
    py2 = tl.load(pd + 3 * s_pk, mask=a_ok, other=0.0)
    bw = px2 - px1
    bh = py2 - py1 + EPS
    p_angle = libdevice.atan(tl.math.div_rn(bw, bh))

    gx1_, gy1_, gx2_, gy2_ = gx1[:, None], gy1[:, None], gx2[:, None], gy2[:, None]
    px1_, py1_, px2_, py2_ = px1[None, :], py1[None, :], px2[None, :], py2[None, :]
    inter_w = tl.maximum(tl.minimum(gx2_, px2_) - tl.maximum(gx1_, px1_), 0.0)
    inter_h = tl.maximum(tl.minimum(gy2_, py2_) - tl.maximum(gy1_, py1_), 0.0)
    inter = inter_w * inter_h
    union = (aw * ah)[:, None] + (bw * bh)[None, :] - inter + EPS
    iou = tl.math.div_rn(inter, union)
    cw = tl.maximum(gx2_, px2_) - tl.minimum(gx1_, px1_)
    ch = tl.maximum(gy2_, py2_) - tl.minimum(gy1_, py1_)
    diag2 = cw * cw + ch * ch + EPS
    dx = px1_ + px2_ - gx1_ - gx2_
    dy = py1_ + py2_ - gy1_ - gy2_
    centre2 = (dx * dx + dy * dy) * 0.25
    d_angle = p_angle[None, :] - g_angle[:, None]
    v = GAIN * (d_angle * d_angle)
    shape_weight = tl.math.div_rn(v, 1.0 - iou + v + EPS)
    ciou = iou - (tl.math.div_rn(centre2, diag2) + v * shape_weight)
    ciou = tl.maximum(ciou, 0.0)
    overlaps = tl.where(candidate, ciou, 0.0)

    score = tl.load(scores_ptr + b64 * s_sb + ai[None, :] * s_sa + label[:, None] * s_sc, mask=pair_ok, other=0.0)
    align = tl.where(candidate, _pow(score, ALPHA) * _pow(overlaps, BETA), 0.0)
    tl.store(overlap_ptr + out, overlaps, mask=pair_ok)
    tl.store(align_ptr + out, align, mask=pair_ok)


def assign_metrics(pd_scores, pd_bboxes, anchor_points, labels, gt_bboxes, mask_gt, min_side, alpha, beta):
    """The kernel behind `spec.assign_metrics` (same arguments and results)."""
    b, a, _ = pd_scores.shape
    n = labels.shape[1]
    device = pd_scores.device
    candidate = torch.empty((b, n, a), dtype=torch.bool, device=device)
    overlaps = torch.empty((b, n, a), dtype=torch.float32, device=device)
    align = torch.empty((b, n, a), dtype=torch.float32, device=device)
    if b * n * a == 0:
        return candidate, overlaps, align
    labels = labels.contiguous()
    gt_bboxes = gt_bboxes.contiguous()
    real = mask_gt.contiguous().view(torch.uint8)
    grid = (triton.cdiv(a, _PAIR_BLOCK_A), triton.cdiv(n, _PAIR_BLOCK_N), b)
    _assign_metrics_kernel[grid](
        pd_scores, *pd_scores.stride(), pd_bboxes, *pd_bboxes.stride(), anchor_points, *anchor_points.stride(),
        labels, gt_bboxes, real, candidate.view(torch.int8), overlaps, align, n, a, float(min_side),
        ALPHA=float(alpha), BETA=float(beta), INSIDE=INSIDE_EPS, EPS=BOX_EPS, GAIN=ASPECT_GAIN,
        BLOCK_N=_PAIR_BLOCK_N, BLOCK_A=_PAIR_BLOCK_A, **_EXACT,
    )
    return candidate, overlaps, align


# ------------------------------------------------------------------------------------------------ assignment positives
# One program per (image, block of anchors) walks the gts in order: whether each picked the anchor among its top-k
# (the top-k kernel's mark), the running positive count, the first positive gt and the first gt of highest overlap.
# Then the anchor's gt, its metric, and (atomically) each gt's largest metric and overlap over its positives.
@DirectLaunch
@triton.jit
def _assign_positives_kernel(picked_ptr, cand_ptr, overlap_ptr, align_ptr,
                             fg_ptr, gt_index_ptr, own_ptr, best_align_ptr, best_overlap_ptr,
                             n, A, BLOCK_A: tl.constexpr):
    b64 = tl.program_id(1).to(tl.int64)
    ai = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ai < A
    n_pos = tl.zeros((BLOCK_A,), tl.int32)
    first_pos = tl.zeros((BLOCK_A,), tl.int32)
    best_overlap = tl.full((BLOCK_A,), -float("inf"), tl.float32)
    best_gt = tl.zeros((BLOCK_A,), tl.int32)
    for g in range(0, n):
        at = (b64 * n + g) * A + ai
        # Padding rows have no candidates (and no marks): never positive.
        positive = (tl.load(picked_ptr + at, mask=a_ok, other=0) != 0) & (tl.load(cand_ptr + at, mask=a_ok, other=0) != 0)
        first_pos = tl.where(positive & (n_pos == 0), g, first_pos)
        n_pos += positive.to(tl.int32)
        overlap = tl.load(overlap_ptr + at, mask=a_ok, other=0.0)
        better = overlap > best_overlap  # strictly: the first gt of highest overlap, as torch's max picks
        best_overlap = tl.where(better, overlap, best_overlap)
        best_gt = tl.where(better, g, best_gt)
    fg = n_pos > 0
    gt = tl.where(n_pos > 1, best_gt, tl.where(fg, first_pos, 0))
    pair = (b64 * n + gt) * A + ai
    own_align = tl.load(align_ptr + pair, mask=a_ok, other=0.0)
    own_overlap = tl.load(overlap_ptr + pair, mask=a_ok, other=0.0)
    out = b64 * A + ai
    tl.store(fg_ptr + out, fg.to(tl.int8), mask=a_ok)
    tl.store(gt_index_ptr + out, gt.to(tl.int64), mask=a_ok)
    tl.store(own_ptr + out, own_align, mask=a_ok)
    # Metrics and overlaps are >= 0, so the float maximum is exact and order-free (the buffers start at 0).
    tl.atomic_max(best_align_ptr + b64 * n + gt, own_align, mask=a_ok & fg)
    tl.atomic_max(best_overlap_ptr + b64 * n + gt, own_overlap, mask=a_ok & fg)


def assign_positives(align, overlaps, candidate, mask_gt, topk):
    """The kernels behind `spec.assign_positives` (same arguments; the top-k kernel's tie rule, see `top_picks`)."""
    b, n, a = align.shape
    if n == 0 or b * a == 0:
        return spec.assign_positives(align, overlaps, candidate, mask_gt, topk)
    return positives_from_picks(top_picks(align, mask_gt, topk), candidate, overlaps, align)


def positives_from_picks(picked, candidate, overlaps, align):
    """The kernel behind `spec.positives_from_picks`; picked (B, n, A) int8."""
    b, n, a = align.shape
    device = align.device
    fg = torch.empty((b, a), dtype=torch.bool, device=device)
    gt_index = torch.empty((b, a), dtype=torch.long, device=device)
    own_align = torch.empty((b, a), dtype=torch.float32, device=device)
    best_align = torch.zeros((b, n), dtype=torch.float32, device=device)
    best_overlap = torch.zeros((b, n), dtype=torch.float32, device=device)
    grid = (triton.cdiv(a, _POSITIVES_BLOCK_A), b)
    _assign_positives_kernel[grid](
        picked.contiguous(), candidate.contiguous().view(torch.int8), overlaps.contiguous(), align.contiguous(), fg.view(torch.int8),
        gt_index, own_align, best_align, best_overlap, n, a, BLOCK_A=_POSITIVES_BLOCK_A,
    )
    return spec.Positives(fg, gt_index, own_align, best_align, best_overlap)


# ------------------------------------------------------------------------------------------------ top-k
# One program per (image, gt) row; padding rows are skipped. A real row sits in registers as unique int64 keys (the
# metric's bits above the complemented anchor index: larger metric first, then lower index), topk rounds of "the
# largest key below the last" find the k-th key, and the keys from it up are the picks: marked in a (B, n, A) mask
# (`top_picks`, for the positives pass) or compacted into the row's k slots in anchor order (`top_indices`).
@triton.jit
def _top_keys(align_ptr, row, A, K: tl.constexpr, BLOCK: tl.constexpr):
    """The row's anchors (BLOCK,) and whether each is among its topk."""
    cols = tl.arange(0, BLOCK)
    ok = cols < A
    x = tl.load(align_ptr + row * A + cols, mask=ok, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0, as in torch's comparisons
    # Metrics are >= 0 (or NaN, which sorts first as in torch.topk): their bits order as their values.
    key = (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))
    key = tl.where(ok, key, -1)
    kth = tl.full((), 9223372036854775807, tl.int64)
    for _ in tl.static_range(K):
        kth = tl.max(tl.where(key < kth, key, -1), 0)
    # Lanes past the row (key -1) are picked only where fewer than K keys exceed -1 (negative NaNs, a row shorter
    # than K): never outside the row.
    return cols, (key >= kth) & ok


@DirectLaunch
@triton.jit
def _top_picks_kernel(align_ptr, real_ptr, picked_ptr, A, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(real_ptr + row) != 0:
        cols, picked = _top_keys(align_ptr, row, A, K, BLOCK)
        tl.store(picked_ptr + row * A + cols, tl.full((BLOCK,), 1, tl.int8), mask=picked)


@DirectLaunch
@triton.jit
def _top_indices_kernel(align_ptr, real_ptr, idx_ptr, A, K: tl.constexpr, K_P2: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(real_ptr + row) == 0:
        ks = tl.arange(0, K_P2)
        tl.store(idx_ptr + row * K + ks, tl.zeros((K_P2,), tl.int64), mask=ks < K)
    else:
        cols, picked = _top_keys(align_ptr, row, A, K, BLOCK)
        slot = tl.cumsum(picked.to(tl.int32), 0) - 1
        tl.store(idx_ptr + row * K + slot, cols.to(tl.int64), mask=picked)


def _top_launch(a):
    block = max(16, triton.next_power_of_2(a))
    return block, max(4, min(_TOP_MAX_WARPS, block // 1024))


def top_picks(align, mask_gt, topk):
    """(B, n, A) int8: 1 at each real row's `spec.top_indices` (0 elsewhere); rows longer than _TOP_BLOCK_MAX anchors
    take torch's top-k (the same values, see the spec)."""
    b, n, a = align.shape
    picked = torch.zeros((b, n, a), dtype=torch.int8, device=align.device)
    if a > _TOP_BLOCK_MAX:
        return picked.scatter_(-1, top_indices(align, mask_gt, topk), 1) * mask_gt.view(b, n, 1)
    if b * n:
        block, warps = _top_launch(a)
        _top_picks_kernel[(b * n,)](align.contiguous(), mask_gt.contiguous().view(torch.uint8), picked, a, K=topk,
                                    BLOCK=block, num_warps=warps)
    return picked


def top_indices(align, mask_gt, topk):
    """The kernel behind `spec.top_indices`, as a set per row (in anchor order); rows longer than _TOP_BLOCK_MAX
    anchors take torch's top-k (the same values, see the spec)."""
    b, n, a = align.shape
    if a > _TOP_BLOCK_MAX:
        # Unsorted: only the picked set matters, and CUDA's top-k selects the same set either way.
        idx = align.topk(topk, dim=-1, sorted=False).indices
        return idx.masked_fill(~mask_gt.view(b, n, 1), 0).contiguous()
    idx = torch.empty((b, n, topk), dtype=torch.long, device=align.device)
    if b * n:
        block, warps = _top_launch(a)
        _top_indices_kernel[(b * n,)](align.contiguous(), mask_gt.contiguous().view(torch.uint8), idx, a, K=topk,
                                      K_P2=max(2, triton.next_power_of_2(topk)), BLOCK=block, num_warps=warps)
    return idx


@triton.jit
def _softmax_rows(logits_ptr, row, cols, A, R: tl.constexpr, R_P2: tl.constexpr):
    """Bins (R_P2, BLOCK_A) of one (image, side) row: probabilities (0 on padded bins), bin numbers, the mask."""
    bins = tl.arange(0, R_P2)
    ok = (bins[:, None] < R) & (cols[None, :] < A)
    offs = (row.to(tl.int64) * R + bins[:, None]) * A + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0)
    x = tl.where(bins[:, None] < R, x, float("-inf"))
    top = tl.max(x, 0)
    e = libdevice.exp(x - top[None, :])
    probs = tl.math.div_rn(e, tl.sum(e, 0)[None, :])
    return probs, bins.to(tl.float32)[:, None], ok, offs


@DirectLaunch
@triton.jit
def _expectation_fwd_kernel(logits_ptr, out_ptr, A, R: tl.constexpr, R_P2: tl.constexpr, BLOCK_A: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    probs, bins, _, _ = _softmax_rows(logits_ptr, row, cols, A, R, R_P2)
    tl.store(out_ptr + row.to(tl.int64) * A + cols, tl.sum(probs * bins, 0), mask=cols < A)


@DirectLaunch
@triton.jit
def _expectation_bwd_kernel(logits_ptr, exp_ptr, grad_ptr, out_ptr, A, R: tl.constexpr, R_P2: tl.constexpr,
                            BLOCK_A: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    probs, bins, ok, offs = _softmax_rows(logits_ptr, row, cols, A, R, R_P2)
    at = row.to(tl.int64) * A + cols
    expectation = tl.load(exp_ptr + at, mask=cols < A, other=0.0)
    grad = tl.load(grad_ptr + at, mask=cols < A, other=0.0)
    tl.store(out_ptr + offs, (bins - expectation[None, :]) * probs * grad[None, :], mask=ok)


def _bin_grid(logits):
    b, _, r, a = logits.shape
    return (triton.cdiv(a, _BIN_BLOCK_A), b * 4), r, triton.next_power_of_2(r), a


def expectation_forward(logits):
    """The kernel behind `spec.expectation_forward`; logits (B, 4, R, A) contiguous."""
    grid, r, r_p2, a = _bin_grid(logits)
    out = torch.empty((logits.shape[0], 4, a), dtype=logits.dtype, device=logits.device)
    if out.numel():
        _expectation_fwd_kernel[grid](logits, out, a, R=r, R_P2=r_p2, BLOCK_A=_BIN_BLOCK_A, **_EXACT)
    return out


def expectation_backward(logits, expectation, grad):
    """The kernel behind `spec.expectation_backward`."""
    grid, r, r_p2, a = _bin_grid(logits)
    out = torch.empty_like(logits)
    if out.numel():
        _expectation_bwd_kernel[grid](logits, expectation.contiguous(), grad.contiguous(), out, a, R=r, R_P2=r_p2,
                                      BLOCK_A=_BIN_BLOCK_A, **_EXACT)
    return out


@triton.jit
def _positive_tile(logits_ptr, image_ptr, anchor_ptr, target_ptr, k, K, A, side: tl.constexpr, R: tl.constexpr,
                   R_P2: tl.constexpr):
    """One side of BLOCK_K positives: logits (BLOCK_K, R_P2), their offsets, validity, left bin and its weight."""
    k_ok = k < K
    image = tl.load(image_ptr + k, mask=k_ok, other=0).to(tl.int64)
    anchor = tl.load(anchor_ptr + k, mask=k_ok, other=0).to(tl.int64)
    bins = tl.arange(0, R_P2)
    ok = k_ok[:, None] & (bins[None, :] < R)
    offs = ((image[:, None] * 4 + side) * R + bins[None, :]) * A + anchor[:, None]
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0)
    x = tl.where(bins[None, :] < R, x, float("-inf"))
    t = tl.load(target_ptr + k * 4 + side, mask=k_ok, other=0.0)
    t = tl.minimum(tl.maximum(t, 0.0), R - 1 - 0.01)
    left = t.to(tl.int32)
    w_left = (left + 1).to(tl.float32) - t
    return x, offs, ok, k_ok, bins, left, w_left


@DirectLaunch
@triton.jit
def _positive_dfl_fwd_kernel(logits_ptr, image_ptr, anchor_ptr, target_ptr, out_ptr, K, A, R: tl.constexpr,
                             R_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_K,), tl.float32)
    for side in tl.static_range(4):
        x, _, _, _, bins, left, w_left = _positive_tile(logits_ptr, image_ptr, anchor_ptr, target_ptr, k, K, A, side,
                                                        R, R_P2)
        top = tl.max(x, 1)
        lse = top + libdevice.log(tl.sum(libdevice.exp(x - top[:, None]), 1))
        x_left = tl.sum(tl.where(bins[None, :] == left[:, None], x, 0.0), 1)
        x_right = tl.sum(tl.where(bins[None, :] == left[:, None] + 1, x, 0.0), 1)
        total += -((x_left - lse) * w_left + (x_right - lse) * (1.0 - w_left))
    tl.store(out_ptr + k, total * 0.25, mask=k < K)


@DirectLaunch
@triton.jit
def _positive_dfl_bwd_kernel(logits_ptr, image_ptr, anchor_ptr, target_ptr, grad_ptr, out_ptr, K, A, R: tl.constexpr,
                             R_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    for side in tl.static_range(4):
        x, offs, ok, k_ok, bins, left, w_left = _positive_tile(logits_ptr, image_ptr, anchor_ptr, target_ptr, k, K, A,
                                                               side, R, R_P2)
        e = libdevice.exp(x - tl.max(x, 1)[:, None])
        probs = tl.math.div_rn(e, tl.sum(e, 1)[:, None])
        t = tl.where(bins[None, :] == left[:, None], w_left[:, None], 0.0)
        t = tl.where(bins[None, :] == left[:, None] + 1, (1.0 - w_left)[:, None], t)
        scale = tl.load(grad_ptr + k, mask=k_ok, other=0.0) * 0.25
        # Atomic: repeated (image, anchor) pairs (filler entries, of zero gradient) must not race with real ones.
        tl.atomic_add(out_ptr + offs, (probs - t) * scale[:, None], mask=ok)


def _positive_launch(logits, image, anchor, target):
    k = image.numel()
    r = logits.shape[2]
    grid = (triton.cdiv(k, _POS_BLOCK_K),)
    return k, grid, r, triton.next_power_of_2(r), logits.shape[3]


def positive_dfl_forward(logits, image, anchor, target):
    """The kernel behind `spec.positive_dfl_forward`."""
    k, grid, r, r_p2, a = _positive_launch(logits, image, anchor, target)
    out = torch.empty(k, dtype=logits.dtype, device=logits.device)
    if k:
        _positive_dfl_fwd_kernel[grid](logits, image.contiguous(), anchor.contiguous(), target.contiguous(), out, k, a,
                                       R=r, R_P2=r_p2, BLOCK_K=_POS_BLOCK_K, **_EXACT)
    return out


def positive_dfl_backward_add(grad_logits, logits, image, anchor, target, grad):
    """The kernel behind `spec.positive_dfl_backward_add` (adds into `grad_logits` in place)."""
    k, grid, r, r_p2, a = _positive_launch(logits, image, anchor, target)
    if k:
        _positive_dfl_bwd_kernel[grid](logits, image.contiguous(), anchor.contiguous(), target.contiguous(),
                                       grad.contiguous(), grad_logits, k, a, R=r, R_P2=r_p2, BLOCK_K=_POS_BLOCK_K,
                                       **_EXACT)
    return grad_logits


# ---------------------------------------------------------------------------------------------------------- box term
@triton.jit
def _tie_share(x, other, WINS_ABOVE: tl.constexpr):
    """spec._tie_share: 1 where x wins (x > other with WINS_ABOVE, else x < other), 1/2 at a tie, else 0."""
    if WINS_ABOVE:
        wins = x > other
    else:
        wins = x < other
    return tl.where(x == other, 0.5, tl.where(wins, 1.0, 0.0))


@DirectLaunch
@triton.jit
def _positive_boxes_kernel(exp_ptr, anchor_ptr, stride_ptr, index_ptr, valid_ptr, tbox_ptr, tscore_ptr,
                           loss_ptr, weight_ptr, dfl_ptr, grad_ptr, K, A, NC, DFL_MAX, EPS: tl.constexpr,
                           GAIN: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    index = tl.load(index_ptr + k, mask=k_ok, other=0).to(tl.int64)
    valid = (tl.load(valid_ptr + k, mask=k_ok, other=0) != 0) & k_ok
    image = index // A
    anchor = index % A
    px = tl.load(anchor_ptr + anchor * 2, mask=k_ok, other=0.0)
    py = tl.load(anchor_ptr + anchor * 2 + 1, mask=k_ok, other=0.0)
    row = image * 4 * A + anchor
    ax1 = px - tl.load(exp_ptr + row, mask=k_ok, other=0.0)
    ay1 = py - tl.load(exp_ptr + row + A, mask=k_ok, other=0.0)
    ax2 = px + tl.load(exp_ptr + row + 2 * A, mask=k_ok, other=0.0)
    ay2 = py + tl.load(exp_ptr + row + 3 * A, mask=k_ok, other=0.0)
    stride = tl.load(stride_ptr + anchor, mask=k_ok, other=1.0)
    bx1 = tl.where(valid, tl.math.div_rn(tl.load(tbox_ptr + index * 4, mask=valid, other=0.0), stride), ax1)
    by1 = tl.where(valid, tl.math.div_rn(tl.load(tbox_ptr + index * 4 + 1, mask=valid, other=0.0), stride), ay1)
    bx2 = tl.where(valid, tl.math.div_rn(tl.load(tbox_ptr + index * 4 + 2, mask=valid, other=0.0), stride), ax2)
    by2 = tl.where(valid, tl.math.div_rn(tl.load(tbox_ptr + index * 4 + 3, mask=valid, other=0.0), stride), ay2)
    weight = tl.zeros((BLOCK_K,), tl.float32)
    for c in range(NC):  # one-hot scores: the sum is exact in any order
        weight += tl.load(tscore_ptr + index * NC + c, mask=valid, other=0.0)

    tl.store(dfl_ptr + k * 4, tl.minimum(tl.maximum(px - bx1, 0.0), DFL_MAX), mask=k_ok)
    tl.store(dfl_ptr + k * 4 + 1, tl.minimum(tl.maximum(py - by1, 0.0), DFL_MAX), mask=k_ok)
    tl.store(dfl_ptr + k * 4 + 2, tl.minimum(tl.maximum(bx2 - px, 0.0), DFL_MAX), mask=k_ok)
    tl.store(dfl_ptr + k * 4 + 3, tl.minimum(tl.maximum(by2 - py, 0.0), DFL_MAX), mask=k_ok)

    # CIoU(pred, target) in spec.ciou_parts' order.
    aw = ax2 - ax1
    ah = ay2 - ay1 + EPS
    bw = bx2 - bx1
    bh = by2 - by1 + EPS
    inter_w = tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1)
    inter_h = tl.minimum(ay2, by2) - tl.maximum(ay1, by1)
    inter = tl.maximum(inter_w, 0.0) * tl.maximum(inter_h, 0.0)
    union = aw * ah + bw * bh - inter + EPS
    iou = tl.math.div_rn(inter, union)
    cw = tl.maximum(ax2, bx2) - tl.minimum(ax1, bx1)
    ch = tl.maximum(ay2, by2) - tl.minimum(ay1, by1)
    diag2 = cw * cw + ch * ch + EPS
    dx = bx1 + bx2 - ax1 - ax2
    dy = by1 + by2 - ay1 - ay2
    centre2 = tl.math.div_rn(dx * dx + dy * dy, 4.0)
    ratio = tl.math.div_rn(aw, ah)
    angle_gap = libdevice.atan(tl.math.div_rn(bw, bh)) - libdevice.atan(ratio)
    v = GAIN * (angle_gap * angle_gap)
    shape_weight = tl.math.div_rn(v, 1.0 - iou + v + EPS)
    ciou = iou - (tl.math.div_rn(centre2, diag2) + v * shape_weight)
    tl.store(loss_ptr + k, (1.0 - ciou) * weight, mask=k_ok)
    tl.store(weight_ptr + k, weight, mask=k_ok)

    # spec.ciou_gradient.
    iou_over_union = tl.math.div_rn(inter, union)
    d_inter = tl.math.div_rn(1.0, union) + tl.math.div_rn(iou_over_union, union)
    d_area = -tl.math.div_rn(iou_over_union, union)
    d_inter_w = d_inter * tl.maximum(inter_h, 0.0) * tl.where(inter_w >= 0, 1.0, 0.0)
    d_inter_h = d_inter * tl.maximum(inter_w, 0.0) * tl.where(inter_h >= 0, 1.0, 0.0)
    d_diag2 = tl.math.div_rn(centre2, diag2 * diag2)
    d_cw = d_diag2 * 2.0 * cw
    d_ch = d_diag2 * 2.0 * ch
    d_ratio = tl.math.div_rn(GAIN * 2.0 * angle_gap * shape_weight, 1.0 + ratio * ratio)
    d_w = d_area * ah + tl.math.div_rn(d_ratio, ah)
    d_h = d_area * aw - tl.math.div_rn(d_ratio * aw, ah * ah)
    d_centre_x = tl.math.div_rn(dx, 2.0 * diag2)
    d_centre_y = tl.math.div_rn(dy, 2.0 * diag2)
    dx1 = -d_inter_w * _tie_share(ax1, bx1, True) - d_cw * _tie_share(ax1, bx1, False) - d_w + d_centre_x
    dy1 = -d_inter_h * _tie_share(ay1, by1, True) - d_ch * _tie_share(ay1, by1, False) - d_h + d_centre_y
    dx2 = d_inter_w * _tie_share(ax2, bx2, False) + d_cw * _tie_share(ax2, bx2, True) + d_w + d_centre_x
    dy2 = d_inter_h * _tie_share(ay2, by2, False) + d_ch * _tie_share(ay2, by2, True) + d_h + d_centre_y
    tl.store(grad_ptr + k * 4, dx1 * weight, mask=k_ok)
    tl.store(grad_ptr + k * 4 + 1, dy1 * weight, mask=k_ok)
    tl.store(grad_ptr + k * 4 + 2, -dx2 * weight, mask=k_ok)
    tl.store(grad_ptr + k * 4 + 3, -dy2 * weight, mask=k_ok)


@DirectLaunch
@triton.jit
def _positive_boxes_bwd_kernel(grad_ptr, grad_loss_ptr, index_ptr, valid_ptr, out_ptr, K, A, BLOCK_K: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    valid = (tl.load(valid_ptr + k, mask=k_ok, other=0) != 0) & k_ok
    index = tl.load(index_ptr + k, mask=valid, other=0).to(tl.int64)
    scale = tl.load(grad_loss_ptr + k, mask=valid, other=0.0)
    row = (index // A) * 4 * A + index % A
    for side in tl.static_range(4):  # valid positives are distinct: plain stores
        tl.store(out_ptr + row + side * A, tl.load(grad_ptr + k * 4 + side, mask=valid, other=0.0) * scale,
                 mask=valid)


def positive_boxes(expectation, anchor_points, stride_tensor, index, valid, target_bboxes, target_scores, reg_max):
    """The kernel behind `spec.positive_boxes` (same arguments and results)."""
    k = index.numel()
    b, _, a = expectation.shape
    device = expectation.device
    loss = torch.empty(k, dtype=torch.float32, device=device)
    weight = torch.empty(k, dtype=torch.float32, device=device)
    dfl_target = torch.empty((k, 4), dtype=torch.float32, device=device)
    grad = torch.empty((k, 4), dtype=torch.float32, device=device)
    if k:
        _positive_boxes_kernel[(triton.cdiv(k, _BOX_BLOCK_K),)](
            expectation.contiguous(), anchor_points.contiguous(), stride_tensor.contiguous(), index.contiguous(),
            valid.contiguous().view(torch.int8), target_bboxes.contiguous(), target_scores.contiguous(), loss, weight,
            dfl_target, grad, k, a, target_scores.shape[-1], reg_max - 1 - 0.01, EPS=BOX_EPS, GAIN=ASPECT_GAIN,
            BLOCK_K=_BOX_BLOCK_K, **_EXACT,
        )
    return spec.PositiveBoxes(loss, weight, dfl_target, grad)


def positive_boxes_backward(grad, grad_loss, index, valid, shape):
    """The kernel behind `spec.positive_boxes_backward`."""
    out = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    k = index.numel()
    if k:
        _positive_boxes_bwd_kernel[(triton.cdiv(k, _BOX_BLOCK_K),)](
            grad, grad_loss.contiguous(), index.contiguous(), valid.contiguous().view(torch.int8), out, k, shape[2],
            BLOCK_K=_BOX_BLOCK_K, **_EXACT,
        )
    return out


# ---------------------------------------------------------------------------------------------------------- class term
# One program per (image, class) row and block of anchors: the soft target is the anchor's score where the class is
# the anchor's, read from the (B, A) class and score rows (cached across the classes).
@triton.jit
def _class_target_and_logit(x_ptr, label_ptr, score_ptr, NC, A, BLOCK_A: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)  # image * NC + class
    image, cls = row // NC, row % NC
    ai = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    ok = ai < A
    x = tl.load(x_ptr + row * A + ai, mask=ok, other=0.0)
    label = tl.load(label_ptr + image * A + ai, mask=ok, other=-1)
    score = tl.load(score_ptr + image * A + ai, mask=ok, other=0.0)
    return x, tl.where(label == cls, score, 0.0), row * A + ai, ok


@DirectLaunch
@triton.jit
def _class_bce_fwd_kernel(x_ptr, label_ptr, score_ptr, partial_ptr, NC, A, BLOCK_A: tl.constexpr):
    x, t, _, ok = _class_target_and_logit(x_ptr, label_ptr, score_ptr, NC, A, BLOCK_A)
    log_sigmoid = tl.minimum(x, 0.0) - libdevice.log1p(libdevice.exp(-tl.abs(x)))
    loss = tl.where(ok, (1.0 - t) * x - log_sigmoid, 0.0)
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(loss, 0))


@DirectLaunch
@triton.jit
def _class_bce_bwd_kernel(x_ptr, label_ptr, score_ptr, grad_ptr, out_ptr, NC, A, BLOCK_A: tl.constexpr):
    x, t, at, ok = _class_target_and_logit(x_ptr, label_ptr, score_ptr, NC, A, BLOCK_A)
    sigmoid = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-x))
    tl.store(out_ptr + at, (sigmoid - t) * tl.load(grad_ptr), mask=ok)


def _class_grid(logits):
    b, nc, a = logits.shape
    return (triton.cdiv(a, _CLASS_BLOCK_A), b * nc)


def class_bce(logits, labels, score):
    """The kernel behind `spec.class_bce`: per-program partial sums, added by torch (deterministic)."""
    _, nc, a = logits.shape
    grid = _class_grid(logits)
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=logits.device)
    if partial.numel():
        _class_bce_fwd_kernel[grid](logits.contiguous(), labels.contiguous(), score.contiguous(), partial, nc, a,
                                    BLOCK_A=_CLASS_BLOCK_A, **_EXACT)
    return partial.sum()


def class_bce_backward(logits, labels, score, grad):
    """The kernel behind `spec.class_bce_backward`; `grad` a 0-d device tensor (read by the kernel: no sync)."""
    b, nc, a = logits.shape
    out = torch.empty((b, nc, a), dtype=torch.float32, device=logits.device)
    if out.numel():
        _class_bce_bwd_kernel[_class_grid(logits)](logits.contiguous(), labels.contiguous(), score.contiguous(),
                                                   grad.to(torch.float32).contiguous(), out, nc, a,
                                                   BLOCK_A=_CLASS_BLOCK_A, **_EXACT)
    return out


# ---------------------------------------------------------------------------------------------------------- MGIoU
# One program takes BLOCK pairs (see _MGIOU_FULL); a pair's vertices lie along the second dimension (VB slots, a
# power of two).
# The axes are visited one after the other in a loop (pred's edge normals, target's, then x and y), so the vertex
# counts are runtime values and one compilation serves every count up to VB. With one thread per pair (_MGIOU_FULL)
# a reduction across the slots stays in that thread's registers: per axis the four interval ends are four (each gives
# its first extreme slot too), and an edge's vertices and the extreme vertices are picked out of the tiles (`_pick`;
# reading them again from memory and normalising them again took 83 us against 65, 100k x 8 with gradients, H200).
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _mgiou_vertices(ptr, mask_ptr, rows, row_ok, V, VB: tl.constexpr, HAS_MASK: tl.constexpr):
    """Filled vertices x, y (BLOCK, VB) of BLOCK shapes with V slots, the slot each reads, the slot mask, and which
    shapes have a real vertex (BLOCK,)."""
    cols = tl.arange(0, VB)
    ok = row_ok[:, None] & (cols[None, :] < V)
    base = rows.to(tl.int64)[:, None] * V
    if HAS_MASK:
        real = tl.load(mask_ptr + base + cols[None, :], mask=ok, other=0) != 0
        last = tl.associative_scan(tl.where(real, cols[None, :], -1), 1, _max_combine)
        # The last slot's running maximum is the last real slot: what leading padded slots read.
        last_real = tl.max(last, 1)
        source = tl.where(last >= 0, last, last_real[:, None])
        source = tl.maximum(source, 0)
        has_real = last_real >= 0
    else:
        source = cols[None, :] + 0 * rows[:, None]
        has_real = row_ok
    x = tl.load(ptr + (base + source) * 2, mask=ok, other=0.0)
    y = tl.load(ptr + (base + source) * 2 + 1, mask=ok, other=0.0)
    return x, y, source, ok, has_real


@triton.jit
def _mgiou_row_problems(x, y, ok, has_real, row_ok, HAS_MASK: tl.constexpr, NONFINITE: tl.constexpr,
                        EMPTY: tl.constexpr):
    """Per shape (BLOCK,) int32 from its filled vertices: NONFINITE where a real vertex has a non-finite coordinate
    (each real vertex fills its own slot, padded slots repeat real ones), EMPTY where the mask row has no real vertex
    (its slots all read padded slot 0, whatever it holds: not a non-finite problem); `spec.mgiou_problems`."""
    inf = float("inf")
    bad = tl.max((ok & ~((tl.abs(x) < inf) & (tl.abs(y) < inf))).to(tl.int32), 1)
    problems = (bad * has_real.to(tl.int32)) * NONFINITE
    if HAS_MASK:
        problems += (row_ok & ~has_real).to(tl.int32) * EMPTY
    return problems


@triton.jit
def _or_combine(a, b):
    return a | b


@DirectLaunch
@triton.jit
def _mgiou_problems_kernel(p_ptr, t_ptr, pm_ptr, tm_ptr, problems_ptr, N, VP, VT, VB: tl.constexpr,
                           HAS_PM: tl.constexpr, HAS_TM: tl.constexpr, BLOCK: tl.constexpr):
    """The `spec.mgiou_problems` bits of BLOCK pairs, or-ed into the 0-d flag (zeroed by the caller)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    px, py, _, p_ok, p_real = _mgiou_vertices(p_ptr, pm_ptr, rows, row_ok, VP, VB, HAS_PM)
    tx, ty, _, t_ok, t_real = _mgiou_vertices(t_ptr, tm_ptr, rows, row_ok, VT, VB, HAS_TM)
    problems = _mgiou_row_problems(px, py, p_ok, p_real, row_ok, HAS_PM, _PRED_NONFINITE, _PRED_EMPTY)
    problems |= _mgiou_row_problems(tx, ty, t_ok, t_real, row_ok, HAS_TM, _TARGET_NONFINITE, _TARGET_EMPTY)
    found = tl.reduce(problems, 0, _or_combine)
    tl.atomic_or(problems_ptr, found, mask=found != 0)


@triton.jit
def _mgiou_geometry(p_ptr, t_ptr, pm_ptr, tm_ptr, rows, row_ok, VP, VT, VB: tl.constexpr, HAS_PM: tl.constexpr,
                    HAS_TM: tl.constexpr):
    """Both shapes filled and normalised (centred on the joint box, divided by its longer side), their slot masks,
    the slot each filled slot reads, and the scale (BLOCK,)."""
    px, py, p_src, p_ok, _ = _mgiou_vertices(p_ptr, pm_ptr, rows, row_ok, VP, VB, HAS_PM)
    tx, ty, t_src, t_ok, _ = _mgiou_vertices(t_ptr, tm_ptr, rows, row_ok, VT, VB, HAS_TM)
    inf = float("inf")
    lx = tl.minimum(tl.min(tl.where(p_ok, px, inf), 1), tl.min(tl.where(t_ok, tx, inf), 1))
    ly = tl.minimum(tl.min(tl.where(p_ok, py, inf), 1), tl.min(tl.where(t_ok, ty, inf), 1))
    hx = tl.maximum(tl.max(tl.where(p_ok, px, -inf), 1), tl.max(tl.where(t_ok, tx, -inf), 1))
    hy = tl.maximum(tl.max(tl.where(p_ok, py, -inf), 1), tl.max(tl.where(t_ok, ty, -inf), 1))
    cx = tl.where(row_ok, (lx + hx) * 0.5, 0.0)  # rows past N: no vertex, keep their lanes finite
    cy = tl.where(row_ok, (ly + hy) * 0.5, 0.0)
    extent = tl.maximum(hx - lx, hy - ly)
    scale = tl.where(extent > 0, extent, 1.0)
    scale = tl.where(row_ok, scale, 1.0)
    px = tl.math.div_rn(px - cx[:, None], scale[:, None])
    py = tl.math.div_rn(py - cy[:, None], scale[:, None])
    tx = tl.math.div_rn(tx - cx[:, None], scale[:, None])
    ty = tl.math.div_rn(ty - cy[:, None], scale[:, None])
    return px, py, tx, ty, p_ok, t_ok, p_src, t_src, scale


@triton.jit
def _pick(tile, slot, cols):
    """The value (BLOCK,) in slot `slot` (BLOCK,) of each row of a (BLOCK, VB) tile, exactly (the other slots add 0)."""
    return tl.sum(tl.where(cols[None, :] == slot[:, None], tile, 0.0), 1)


@triton.jit
def _mgiou_support(x, y, ok, ax, ay, WITH_GRAD: tl.constexpr):
    """Lowest and highest projection (BLOCK,) of the real slots on the axes (BLOCK,) and, WITH_GRAD, the first slot
    reaching each (argmin/argmax's choice; one reduction gives value and slot)."""
    proj = x * ax[:, None] + y * ay[:, None]
    inf = float("inf")
    if WITH_GRAD:
        lo, lo_at = tl.min(tl.where(ok, proj, inf), 1, return_indices=True, return_indices_tie_break_left=True)
        hi, hi_at = tl.max(tl.where(ok, proj, -inf), 1, return_indices=True, return_indices_tie_break_left=True)
    else:
        lo = tl.min(tl.where(ok, proj, inf), 1)
        hi = tl.max(tl.where(ok, proj, -inf), 1)
        lo_at = tl.full(lo.shape, 0, tl.int32)  # not needed without a gradient
        hi_at = lo_at
    return lo, hi, lo_at, hi_at


@triton.jit
def _mgiou_add(g, cols, slot, value):
    """g (BLOCK, VB) plus `value` (BLOCK,) in slot `slot` (BLOCK,) of each row."""
    return g + tl.where(cols[None, :] == slot[:, None], value[:, None], 0.0)


@triton.jit
def _mgiou_pull(g_ax, g_ay, d, shape, slot, cols):
    """The axis gradient (g_ax, g_ay) plus `d` (BLOCK,), an interval end's gradient, times the vertex in `slot`
    (BLOCK,) of `shape` that reaches that end."""
    x, y, _ = shape
    return g_ax + d * _pick(x, slot, cols), g_ay + d * _pick(y, slot, cols)


@triton.jit
def _mgiou_axis(p, t, cols, ax, ay, axis_sq, extra_valid, total, count, gpx, gpy, gtx, gty,
                WITH_GRAD: tl.constexpr, SPREAD_SQ: tl.constexpr):
    """One axis: its 1-D GIoU added to the running sum and count where valid and, WITH_GRAD, its gradient for a unit
    upstream gradient of each valid axis's GIoU (`spec._mgiou_unit_gradients`): added to the four extreme vertices
    (times the axis); returned for the axis itself (the extreme vertices, times the gradients of the ends)."""
    px, py, p_ok = p
    tx, ty, t_ok = t
    p_lo, p_hi, p_lo_at, p_hi_at = _mgiou_support(px, py, p_ok, ax, ay, WITH_GRAD)
    t_lo, t_hi, t_lo_at, t_hi_at = _mgiou_support(tx, ty, t_ok, ax, ay, WITH_GRAD)
    overlap = tl.minimum(p_hi, t_hi) - tl.maximum(p_lo, t_lo)
    hull = (p_hi - p_lo) + (t_hi - t_lo) - overlap
    valid = (hull * hull > SPREAD_SQ * axis_sq) & extra_valid
    safe_hull = tl.where(valid, hull, 1.0)
    giou = tl.where(valid, tl.math.div_rn(overlap, safe_hull), 0.0)
    total += giou
    count += valid.to(tl.int32)
    g_ax = tl.zeros_like(ax)
    g_ay = tl.zeros_like(ay)
    if WITH_GRAD:
        u_overlap = tl.where(valid, tl.math.div_rn(tl.full(ax.shape, 1.0, tl.float32), safe_hull), 0.0)
        u_hull = -(u_overlap * giou)
        u_ends = u_overlap - u_hull  # overlap's total: direct, and through hull = ... - overlap
        w_hi = tl.where(p_hi < t_hi, 1.0, tl.where(p_hi == t_hi, 0.5, 0.0))  # min/max of equal ends: halves
        w_lo = tl.where(p_lo > t_lo, 1.0, tl.where(p_lo == t_lo, 0.5, 0.0))
        d_p_hi = u_hull + u_ends * w_hi
        d_t_hi = u_hull + u_ends * (1.0 - w_hi)
        d_p_lo = -u_hull - u_ends * w_lo
        d_t_lo = -u_hull - u_ends * (1.0 - w_lo)
        gpx = _mgiou_add(_mgiou_add(gpx, cols, p_hi_at, d_p_hi * ax), cols, p_lo_at, d_p_lo * ax)
        gpy = _mgiou_add(_mgiou_add(gpy, cols, p_hi_at, d_p_hi * ay), cols, p_lo_at, d_p_lo * ay)
        gtx = _mgiou_add(_mgiou_add(gtx, cols, t_hi_at, d_t_hi * ax), cols, t_lo_at, d_t_lo * ax)
        gty = _mgiou_add(_mgiou_add(gty, cols, t_hi_at, d_t_hi * ay), cols, t_lo_at, d_t_lo * ay)
        g_ax, g_ay = _mgiou_pull(g_ax, g_ay, d_p_hi, p, p_hi_at, cols)
        g_ax, g_ay = _mgiou_pull(g_ax, g_ay, d_p_lo, p, p_lo_at, cols)
        g_ax, g_ay = _mgiou_pull(g_ax, g_ay, d_t_hi, t, t_hi_at, cols)
        g_ax, g_ay = _mgiou_pull(g_ax, g_ay, d_t_lo, t, t_lo_at, cols)
    return total, count, gpx, gpy, gtx, gty, g_ax, g_ay


@triton.jit
def _mgiou_edges(p, t, cols, V, total, count, gpx, gpy, gtx, gty, OF_PRED: tl.constexpr, WITH_GRAD: tl.constexpr,
                 EDGE_SQ: tl.constexpr, SPREAD_SQ: tl.constexpr):
    """The axes of one shape's V edges (pred's if OF_PRED, else target's), in order: the normal (-e_y, e_x) of edge m
    (vertex m to vertex m + 1, cyclically), valid where not shorter than the edge threshold; each normal passes its
    own gradient on to its edge's two vertices."""
    if OF_PRED:
        x, y, _ = p
    else:
        x, y, _ = t
    slot = tl.zeros_like(count)
    x0, y0 = _pick(x, slot, cols), _pick(y, slot, cols)
    for _ in range(0, V):
        nxt = tl.where(slot + 1 < V, slot + 1, 0)
        x1, y1 = _pick(x, nxt, cols), _pick(y, nxt, cols)
        nx = -(y1 - y0)
        ny = x1 - x0
        nsq = nx * nx + ny * ny
        total, count, gpx, gpy, gtx, gty, g_ax, g_ay = _mgiou_axis(
            p, t, cols, nx, ny, nsq, nsq > EDGE_SQ, total, count, gpx, gpy, gtx, gty, WITH_GRAD, SPREAD_SQ)
        if WITH_GRAD:  # edge e = v[nxt] - v[slot]: d e_x = d normal_y, d e_y = -d normal_x
            if OF_PRED:
                gpx = _mgiou_add(_mgiou_add(gpx, cols, nxt, g_ay), cols, slot, -g_ay)
                gpy = _mgiou_add(_mgiou_add(gpy, cols, nxt, -g_ax), cols, slot, g_ax)
            else:
                gtx = _mgiou_add(_mgiou_add(gtx, cols, nxt, g_ay), cols, slot, -g_ay)
                gty = _mgiou_add(_mgiou_add(gty, cols, nxt, -g_ax), cols, slot, g_ax)
        x0, y0, slot = x1, y1, nxt
    return total, count, gpx, gpy, gtx, gty


@triton.jit
def _mgiou_store_grad(ptr, gx, gy, g, source, ok, rows, cols, V, scale, HAS_MASK: tl.constexpr):
    """Scale the unit gradient by each pair's g, unnormalise (divide by the scale) and hand each filled slot's
    gradient to the slot it reads."""
    gx = tl.math.div_rn(gx * g[:, None], scale[:, None])
    gy = tl.math.div_rn(gy * g[:, None], scale[:, None])
    if HAS_MASK:
        reads = source[:, None, :] == cols[None, :, None]  # (BLOCK, slot i, slot j): slot j reads slot i
        gx = tl.sum(tl.where(reads, gx[:, None, :], 0.0), 2)
        gy = tl.sum(tl.where(reads, gy[:, None, :], 0.0), 2)
    at = (rows.to(tl.int64)[:, None] * V + cols[None, :]) * 2
    tl.store(ptr + at, gx, mask=ok)
    tl.store(ptr + at + 1, gy, mask=ok)


@DirectLaunch
@triton.jit
def _mgiou_kernel(p_ptr, t_ptr, pm_ptr, tm_ptr, loss_ptr, gp_ptr, gt_ptr, N, VP, VT, VB: tl.constexpr,
                  HAS_PM: tl.constexpr, HAS_TM: tl.constexpr, NEED_P: tl.constexpr, NEED_T: tl.constexpr,
                  WITH_GRAD: tl.constexpr, EDGE_SQ: tl.constexpr, SPREAD_SQ: tl.constexpr, BLOCK: tl.constexpr):
    """Loss and, where asked (NEED_P, NEED_T), each pair's loss gradient: one pass over the axes, each axis's
    extremes found once for both (the gradient for a unit upstream gradient per axis, scaled at the end)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    cols = tl.arange(0, VB)
    px, py, tx, ty, p_ok, t_ok, p_src, t_src, scale = _mgiou_geometry(
        p_ptr, t_ptr, pm_ptr, tm_ptr, rows, row_ok, VP, VT, VB, HAS_PM, HAS_TM)
    p = (px, py, p_ok)
    t = (tx, ty, t_ok)
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    gpx = tl.zeros((BLOCK, VB), tl.float32)
    gpy = tl.zeros((BLOCK, VB), tl.float32)
    gtx = tl.zeros((BLOCK, VB), tl.float32)
    gty = tl.zeros((BLOCK, VB), tl.float32)
    # Edge normals: pred's, then target's; each passes its gradient on to its own shape's vertices.
    total, count, gpx, gpy, gtx, gty = _mgiou_edges(p, t, cols, VP, total, count, gpx, gpy, gtx, gty, True,
                                                    WITH_GRAD, EDGE_SQ, SPREAD_SQ)
    total, count, gpx, gpy, gtx, gty = _mgiou_edges(p, t, cols, VT, total, count, gpx, gpy, gtx, gty, False,
                                                    WITH_GRAD, EDGE_SQ, SPREAD_SQ)
    no_edge_axis = count == 0
    one = tl.full((BLOCK,), 1.0, tl.float32)
    zero = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, 2):  # x and y, only where no edge normal is valid (constant axes: no gradient of their own)
        ax = tl.where(k == 0, one, zero)
        ay = tl.where(k == 0, zero, one)
        total, count, gpx, gpy, gtx, gty, _, _ = _mgiou_axis(
            p, t, cols, ax, ay, one, no_edge_axis, total, count, gpx, gpy, gtx, gty, WITH_GRAD, SPREAD_SQ)
    mean = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))
    similarity = tl.where(count > 0, mean, 1.0)
    tl.store(loss_ptr + rows, (1.0 - similarity) * 0.5, mask=row_ok)
    if WITH_GRAD:  # NEED_P or NEED_T
        # d loss / d GIoU of each valid axis: -1/2 / count (the loss is (1 - mean GIoU) / 2).
        g = tl.where(count > 0, tl.math.div_rn(-0.5 + zero, tl.maximum(count, 1).to(tl.float32)), 0.0)
        if NEED_P:
            _mgiou_store_grad(gp_ptr, gpx, gpy, g, p_src, p_ok, rows, cols, VP, scale, HAS_PM)
        if NEED_T:
            _mgiou_store_grad(gt_ptr, gtx, gty, g, t_src, t_ok, rows, cols, VT, scale, HAS_TM)


def _mgiou_operands(pred, target, pred_mask, target_mask):
    """The arguments both MGIoU kernels start with: pred, target and mask pointers (a mask as bytes; where it is
    absent, a placeholder the kernel never reads), the pair count and the vertex counts, and the slot count VB."""
    n, vp, _ = pred.shape
    vt = target.shape[1]
    placeholder = pred
    pm = placeholder if pred_mask is None else pred_mask.contiguous().view(torch.uint8)
    tm = placeholder if target_mask is None else target_mask.contiguous().view(torch.uint8)
    consts = dict(VB=max(2, triton.next_power_of_2(max(vp, vt))), HAS_PM=pred_mask is not None,
                  HAS_TM=target_mask is not None)
    return (pred.contiguous(), target.contiguous(), pm, tm), (n, vp, vt), consts


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (kept); 1 for CPU tensors (Triton's interpreter, no warps)."""
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNTS:  # a tensor's CUDA device always has its index
        _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device.index).multi_processor_count
    return _SM_COUNTS[device.index]


def mgiou_problems(pred, target, pred_mask, target_mask, out=None):
    """The kernel behind `spec.mgiou_problems` (CUDA vertices of any float dtype; the same 0-d int32 bits, or-ed into
    `out` where given)."""
    pointers, counts, consts = _mgiou_operands(pred, target, pred_mask, target_mask)
    problems = torch.zeros((), dtype=torch.int32, device=pred.device) if out is None else out
    if counts[0]:
        grid = (triton.cdiv(counts[0], _MGIOU_PROBLEMS_BLOCK),)
        _mgiou_problems_kernel[grid](*pointers, problems, *counts, **consts, BLOCK=_MGIOU_PROBLEMS_BLOCK)
    return problems


def mgiou_launch(pred, target, pred_mask, target_mask, loss, grad_pred, grad_target):
    """Grid, arguments and keywords of the MGIoU kernel for N > 0 pairs writing `loss` and the gradients given (None:
    not asked for): `_mgiou_kernel[grid](*args, **kwargs)`."""
    pointers, counts, consts = _mgiou_operands(pred, target, pred_mask, target_mask)
    n = counts[0]
    block, warps = _MGIOU_FULL if triton.cdiv(n, _MGIOU_FEW[0]) >= _sm_count(pred.device) else _MGIOU_FEW
    need_pred, need_target = grad_pred is not None, grad_target is not None
    args = (*pointers, loss, pred if grad_pred is None else grad_pred, target if grad_target is None else grad_target,
            *counts)
    kwargs = dict(NEED_P=need_pred, NEED_T=need_target, WITH_GRAD=need_pred or need_target, **consts,
                  EDGE_SQ=MGIOU_EDGE_EPS * MGIOU_EDGE_EPS, SPREAD_SQ=MGIOU_SPREAD_EPS * MGIOU_SPREAD_EPS, BLOCK=block,
                  num_warps=warps, **_EXACT)
    return (triton.cdiv(n, block),), args, kwargs


def mgiou_forward(pred, target, pred_mask, target_mask, need_pred=False, need_target=False):
    """The kernel behind `spec.mgiou_forward` (float32 CUDA vertices; same arguments and results)."""
    n = pred.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=pred.device)
    # Contiguous (N, V, 2), the layout the kernel writes (empty_like would copy a non-contiguous input's strides).
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_pred else None
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if need_target else None
    if n:
        grid, args, kwargs = mgiou_launch(pred, target, pred_mask, target_mask, loss, grad_pred, grad_target)
        _mgiou_kernel[grid](*args, **kwargs)
    return loss, grad_pred, grad_target
