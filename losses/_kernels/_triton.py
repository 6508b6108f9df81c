"""Triton kernels with the signatures and operation order of `losses._kernels.spec` (float32, CUDA tensors).

Importing this module needs Triton; `losses._kernels` imports it behind a guard. Every kernel is launched with
`enable_fp_fusion=False`, divisions are round-to-nearest (`div_rn`) and exp/log/atan/pow are libdevice's, so that the
arithmetic rounds as torch's one-op-at-a-time kernels do: on an H200 the candidate mask equals the spec's and 99.7 %
of the metrics are bit-equal, the rest within two ulps (tests/test_kernels.py; docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .spec import ASPECT_GAIN, BOX_EPS, INSIDE_EPS

_EXACT = {"enable_fp_fusion": False}
_PAIR_BLOCK_N = 16
_PAIR_BLOCK_A = 128
_BIN_BLOCK_A = 128
_POS_BLOCK_K = 32


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
    aw = gx2 - gx1
    ah = gy2 - gy1 + EPS
    g_angle = libdevice.atan(tl.math.div_rn(aw, ah))

    # Per anchor (BLOCK_A,): its point, the predicted box and its aspect angle.
    x = tl.load(anchor_ptr + ai * s_aa, mask=a_ok, other=0.0)
    y = tl.load(anchor_ptr + ai * s_aa + s_ak, mask=a_ok, other=0.0)
    pd = pd_ptr + b64 * s_pb + ai * s_pa
    px1 = tl.load(pd, mask=a_ok, other=0.0)
    py1 = tl.load(pd + s_pk, mask=a_ok, other=0.0)
    px2 = tl.load(pd + 2 * s_pk, mask=a_ok, other=0.0)
    py2 = tl.load(pd + 3 * s_pk, mask=a_ok, other=0.0)
    bw = px2 - px1
    bh = py2 - py1 + EPS
    p_angle = libdevice.atan(tl.math.div_rn(bw, bh))

    # Pairs (BLOCK_N, BLOCK_A).
    inside = (
        ((x[None, :] - ex1[:, None]) > INSIDE) & ((y[None, :] - ey1[:, None]) > INSIDE)
        & ((ex2[:, None] - x[None, :]) > INSIDE) & ((ey2[:, None] - y[None, :]) > INSIDE)
    )
    pair_ok = g_ok[:, None] & a_ok[None, :]
    candidate = inside & real[:, None] & pair_ok

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

    out = (b64 * n + gi[:, None]) * A + ai[None, :]
    tl.store(cand_ptr + out, candidate.to(tl.int8), mask=pair_ok)
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


@triton.jit
def _expectation_fwd_kernel(logits_ptr, out_ptr, A, R: tl.constexpr, R_P2: tl.constexpr, BLOCK_A: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    probs, bins, _, _ = _softmax_rows(logits_ptr, row, cols, A, R, R_P2)
    tl.store(out_ptr + row.to(tl.int64) * A + cols, tl.sum(probs * bins, 0), mask=cols < A)


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
