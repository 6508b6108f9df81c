"""Entry points of the fused kernels: the Triton kernel where it runs, otherwise the pure-torch spec (same results)."""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from . import spec

try:  # the import guard: without Triton every entry point runs the spec
    from . import _triton
except ImportError as exc:  # Triton not installed (CPU-only torch, CI)
    _triton = None
    UNAVAILABLE_REASON: str | None = f"Triton is not importable ({exc}); the pure-torch specs run instead"
else:
    UNAVAILABLE_REASON = None


def available(tensor: torch.Tensor | None = None) -> bool:
    """True where the Triton kernels run: Triton importable, CUDA present and, given a tensor, a CUDA float32 one."""
    if _triton is None:
        return False
    if tensor is None:
        return torch.cuda.is_available()
    return tensor.is_cuda and tensor.dtype == torch.float32  # a CUDA tensor: CUDA is available (is_available: ~10 us)


def _backend(tensor: torch.Tensor):
    return _triton if available(tensor) else spec


# ------------------------------------------------------------------------------------------------ assignment metric
def assign_metrics(pd_scores, pd_bboxes, anchor_points, labels, gt_bboxes, mask_gt, min_side, alpha, beta):
    """(candidate, overlaps, align) over the dense (B, n, A) pairs; see `spec.assign_metrics`. No gradient."""
    backend = _backend(pd_bboxes)
    if backend is _triton and not (pd_scores.dtype == anchor_points.dtype == gt_bboxes.dtype == torch.float32):
        backend = spec
    with torch.no_grad():
        return backend.assign_metrics(pd_scores, pd_bboxes, anchor_points, labels, gt_bboxes, mask_gt.bool(),
                                      float(min_side), float(alpha), float(beta))


def assign_positives(align, overlaps, candidate, mask_gt, topk: int) -> spec.Positives:
    """The assignment's positives from the dense metrics; see `spec.assign_positives`. No gradient."""
    backend = _backend(align)
    if backend is _triton and overlaps.dtype != torch.float32:
        backend = spec
    with torch.no_grad():
        return backend.assign_positives(align, overlaps, candidate, mask_gt.bool(), int(topk))


# ------------------------------------------------------------------------------------------------ DFL
class _PendingPositives:
    """Carries the positive DFL term's gradient from its backward to the expectation's backward, which adds it."""

    def __init__(self):
        self.items: list[tuple[torch.Tensor, ...]] = []


class _Expectation(torch.autograd.Function):
    """E[bin] (B, 4, A) of logits (B, 4, R, A); the backward also adds the gradients of `positive_dfl` terms."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, pending: _PendingPositives) -> torch.Tensor:
        expectation = _backend(logits).expectation_forward(logits)
        ctx.save_for_backward(logits, expectation)
        ctx.pending = pending
        return expectation

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, expectation = ctx.saved_tensors
        backend = _backend(logits)
        grad_logits = backend.expectation_backward(logits, expectation, grad)
        for image, anchor, target, grad_loss in ctx.pending.items:
            backend.positive_dfl_backward_add(grad_logits, logits, image, anchor, target, grad_loss)
        ctx.pending.items.clear()
        return grad_logits, None


class _PositiveDFL(torch.autograd.Function):
    """DFL (K,) at positives. Its input is the expectation, so autograd runs this backward first; the gradient goes
    to the logits through the expectation's backward (one dense write), not through a second dense tensor."""

    @staticmethod
    def forward(ctx, expectation, logits, pending, image, anchor, target):
        ctx.save_for_backward(image, anchor, target)
        ctx.pending = pending
        return _backend(logits).positive_dfl_forward(logits, image, anchor, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        image, anchor, target = ctx.saved_tensors
        ctx.pending.items.append((image, anchor, target, grad))
        return None, None, None, None, None, None


class DFLDistances:
    """The DFL branch of one loss evaluation: `expectation` (B, 4, A) in bins and `positive_loss(...)` (K,)."""

    def __init__(self, boxes: torch.Tensor, reg_max: int):
        b, c, a = boxes.shape
        if c != 4 * reg_max:
            raise ValueError(f"dfl_expectation got {c} channels; expected 4 * reg_max = {4 * reg_max}")
        self.logits = boxes.view(b, 4, reg_max, a)
        if not self.logits.is_contiguous():
            self.logits = self.logits.contiguous()
        self._pending = _PendingPositives()
        self.expectation = _Expectation.apply(self.logits, self._pending)

    def positive_loss(self, image: torch.Tensor, anchor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """DFL cross-entropy (K,) of anchors (image, anchor) towards target (K, 4) distances in bins; as
        `losses._boxes.dfl_loss(boxes[image, :, anchor].view(K, 4, R), target)`."""
        return _PositiveDFL.apply(self.expectation, self.logits.detach(), self._pending, image, anchor, target)


def dfl_expectation(boxes: torch.Tensor, reg_max: int) -> DFLDistances:
    """(B, 4*reg_max, A) logits -> the DFL branch: `.expectation` as `heads._decode.dfl_expectation`, and
    `.positive_loss(image, anchor, target)`."""
    return DFLDistances(boxes, reg_max)


def positive_dfl(branch: DFLDistances, image, anchor, target) -> torch.Tensor:
    """`branch.positive_loss(image, anchor, target)`."""
    return branch.positive_loss(image, anchor, target)


# ------------------------------------------------------------------------------------------------ box term
class _PositiveBoxes(torch.autograd.Function):
    """The box term at the positives (`spec.positive_boxes`): its loss (K,) and, without gradient, the weights and DFL
    targets. The forward computes the gradient too; the backward scales it and writes it into the expectation's
    dense gradient (one zero fill and one scatter)."""

    @staticmethod
    def forward(ctx, expectation, anchor_points, stride_tensor, index, valid, target_bboxes, target_scores, reg_max):
        backend = _positive_boxes_backend(expectation, anchor_points, stride_tensor, target_bboxes, target_scores)
        parts = backend.positive_boxes(expectation, anchor_points, stride_tensor, index, valid, target_bboxes,
                                       target_scores, reg_max)
        ctx.save_for_backward(parts.grad, index, valid)
        ctx.backend, ctx.shape, ctx.dtype = backend, expectation.shape, expectation.dtype
        ctx.mark_non_differentiable(parts.weight, parts.dfl_target)
        return parts.loss, parts.weight, parts.dfl_target

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_weight, _grad_dfl_target):
        grad, index, valid = ctx.saved_tensors
        grad_expectation = ctx.backend.positive_boxes_backward(grad, grad_loss, index, valid, ctx.shape)
        return grad_expectation.to(ctx.dtype), None, None, None, None, None, None, None


def _positive_boxes_backend(*tensors: torch.Tensor):
    return _triton if all(available(t) for t in tensors) else spec


def positive_boxes(expectation: torch.Tensor, anchor_points: torch.Tensor, stride_tensor: torch.Tensor,
                   index: torch.Tensor, valid: torch.Tensor, target_bboxes: torch.Tensor, target_scores: torch.Tensor,
                   reg_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, weight, dfl_target) of `spec.positive_boxes`; the loss carries the gradient to `expectation`."""
    return _PositiveBoxes.apply(expectation, anchor_points, stride_tensor, index, valid, target_bboxes, target_scores,
                                int(reg_max))


# ------------------------------------------------------------------------------------------------ class term
class _ClassBCE(torch.autograd.Function):
    """`spec.class_bce` (0-d) with `spec.class_bce_backward` as its backward (one pass over the logits each way)."""

    @staticmethod
    def forward(ctx, logits, labels, score):
        backend = _triton if available(logits) and available(score) else spec
        ctx.save_for_backward(logits, labels, score)
        ctx.backend = backend
        return backend.class_bce(logits, labels, score)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, labels, score = ctx.saved_tensors
        return ctx.backend.class_bce_backward(logits, labels, score, grad), None, None


def class_bce(logits: torch.Tensor, labels: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The classification term's BCE sum of logits (B, nc, A) against the soft targets `score` (B, A) at class
    `labels` (B, A) (`spec.class_bce`), with its gradient to the logits."""
    return _ClassBCE.apply(logits, labels, score)


# ------------------------------------------------------------------------------------------------ MGIoU
def mgiou_runs(pred: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `mgiou_loss` runs the Triton kernel for these vertices: Triton importable, both on a CUDA device and
    computed in float32 (float16, bfloat16 and float32 input; float64 keeps the reference's float64 arithmetic)."""
    return (
        _triton is not None
        and pred.is_cuda
        and target.is_cuda
        and pred.dtype in _MGIOU_DTYPES
        and target.dtype in _MGIOU_DTYPES
    )


_MGIOU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _MGIoU(torch.autograd.Function):
    """MGIoU loss (N,). One kernel (or the spec) computes the loss and, where an input needs one, each pair's gradient;
    the backward multiplies that by the upstream gradient (a torch op, no second pass over the vertices)."""

    @staticmethod
    def forward(ctx, pred, target, pred_mask, target_mask, need_pred: bool, need_target: bool):
        # Contiguous copies where needed: the kernels address (N, V, 2) rows densely, and the gradients they write are
        # allocated in that layout (an input's own strides, e.g. a transposed view's, would scramble them).
        pred, target = pred.contiguous(), target.contiguous()
        loss, grad_pred, grad_target = _backend(pred).mgiou_forward(pred, target, pred_mask, target_mask, need_pred,
                                                                    need_target)
        ctx.save_for_backward(grad_pred, grad_target)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_pred, grad_target = ctx.saved_tensors
        per_pair = grad[:, None, None]  # broadcast as it comes (a sum's gradient is an expanded view: no copy)
        return (None if grad_pred is None else grad_pred * per_pair,
                None if grad_target is None else grad_target * per_pair, None, None, None, None)


def mgiou_loss(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None = None,
               target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`losses.mgiou._mgiou_loss` (unchecked inputs) in one fused pass, forward and gradient together: the Triton
    kernel where `mgiou_runs`, else `spec.mgiou_forward` (the same operations, in torch). float16 and bfloat16
    vertices are computed in float32, as the reference computes them; the loss is float32. The gradient is computed
    only for inputs that require one while grad mode is on."""
    grad_on = torch.is_grad_enabled()
    need_pred, need_target = grad_on and pred.requires_grad, grad_on and target.requires_grad
    if pred.dtype != torch.float32 and pred.dtype in _MGIOU_DTYPES:
        pred = pred.to(torch.float32)
    if target.dtype != torch.float32 and target.dtype in _MGIOU_DTYPES:
        target = target.to(torch.float32)
    return _MGIoU.apply(pred, target, pred_mask, target_mask, need_pred, need_target)


_ZEROED_FLAGS = threading.local()  # per thread: device -> a 0-d int32 flag that holds 0


def mgiou_problems(pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None = None,
                   target_mask: torch.Tensor | None = None) -> int:
    """The `spec.mgiou_problems` bits of these vertices, read (one device sync): one small kernel where `mgiou_runs`,
    else the spec. Read before `mgiou_loss` is queued, it keeps the loss kernel out of the host's wait. The bits are
    or-ed into a flag this thread keeps per device while it reads 0 (so a call queues no fill of a new one)."""
    backend = _triton if mgiou_runs(pred, target) else spec
    zeroed = _ZEROED_FLAGS.__dict__.setdefault("by_device", {})
    flag = zeroed.pop(pred.device, None)
    if flag is None:
        flag = torch.zeros((), dtype=torch.int32, device=pred.device)
    with torch.no_grad():
        bits = int(backend.mgiou_problems(pred, target, pred_mask, target_mask, out=flag))
    if bits == 0:
        zeroed[pred.device] = flag
    return bits
