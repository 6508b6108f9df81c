"""Fused kernels for the detection loss's hot parts, behind an import guard (private).

`available(tensor)` says whether the Triton kernels run for a tensor (Triton importable, a CUDA float32 tensor);
everything else runs the pure-torch specs in `spec`, which compute the same thing in the same operation order. The
entry points (`ops`) choose per call, so callers never branch:

- `dfl_expectation(boxes, reg_max)`: the DFL softmax expectation over bins (the box decode input), with
  `positive_dfl(...)`, the DFL cross-entropy at positives, whose gradient is added by the expectation's own backward
  (one pass writes the dense logits gradient);
- `assign_metrics(...)`: the assigner's candidate mask, CIoU overlaps and alignment metric in one pass over the dense
  (B, n, A) pairs (tiles without a candidate skip the arithmetic); `assign_positives(...)`: from them, after a
  top-k kernel (one program per gt row), the positives (conflicts resolved) and the per-gt best metric and overlap
  in one more pass;
- `positive_boxes(...)`: the box term at the fast path's positives (weight * (1 - CIoU), with the weights and the DFL
  targets), its hand-written CIoU gradient computed in the forward and written into the expectation's dense gradient
  by the backward (`spec.ciou_gradient`: autograd's rules for `losses._boxes.bbox_ciou`, ties included);
- `class_bce(logits, labels, score)`: the classification term's BCE sum from each anchor's class and target score,
  in the head's (B, nc, A) layout, the dense (B, A, nc) targets never built; one pass over the logits each way;
- `mgiou_loss(pred, target, pred_mask, target_mask)`: MGIoU (`losses.mgiou`) and its hand-written gradient in one
  kernel (the backward a multiply), for CUDA vertices computed in float32 (`mgiou_runs(pred, target)` says whether the
  kernel runs; `losses.mgiou` dispatches to it there and keeps its own torch code everywhere else);
  `mgiou_problems` finds non-finite vertices and empty masks (`spec.mgiou_problems`) in one small kernel ahead of
  the loss, which `losses.mgiou.mgiou` reads as its value checks.

Where they run: `losses.assigner.task_aligned_assign` takes its metric from `assign_metrics` on accelerators (the CPU
keeps its exact `nonzero` order) and its positives from `assign_positives` everywhere (the spec on the CPU; soft
targets stay its own torch steps), and the losses' fast path (`losses._fast.FastPath._detection_core`) decodes with
`dfl_expectation`, takes its box term, weights and DFL targets from `positive_boxes`, its DFL term from
`.positive_loss` and its class term from `class_bce`. There is no second loss beside the reference: the
kernels are a backend of its computations.

Tie-breaking contract: the top-k kernel picks the values torch.topk picks, on the kernel's candidates (equal to the
spec's) and metrics (bit-equal to the spec's for 99.7 % of pairs on an H200, the rest within two ulps: CUDA's atan
and torch's differ in the last bit now and then); among exactly equal metrics it takes the lowest anchor index
(`spec.top_indices`), where the reference path takes torch.topk's unspecified choice (which differs between CPU and
CUDA too). Exact ties of non-zero metric do not occur for real inputs, so a changed choice swaps only positives of
zero metric, hence of zero target score and zero weight in every term. Conflict resolution keeps the
first gt of highest overlap, as torch's max does (its documented tie rule), in the kernel and the spec alike.
(Caveats shared with the reference: metrics one ulp apart can swap order; a zero-weight positive still takes part in
conflict resolution.)
"""

from __future__ import annotations

from .ops import (
    UNAVAILABLE_REASON,
    assign_metrics,
    assign_positives,
    available,
    class_bce,
    dfl_expectation,
    mgiou_loss,
    mgiou_problems,
    mgiou_runs,
    positive_boxes,
    positive_dfl,
)

__all__ = ["UNAVAILABLE_REASON", "assign_metrics", "assign_positives", "available", "class_bce", "dfl_expectation",
           "mgiou_loss", "mgiou_problems", "mgiou_runs", "positive_boxes", "positive_dfl"]
