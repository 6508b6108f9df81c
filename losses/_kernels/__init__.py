"""Fused kernels for the detection loss's hot parts, behind an import guard (private).

`available(tensor)` says whether the Triton kernels run for a tensor (Triton importable, a CUDA float32 tensor);
everything else runs the pure-torch specs in `spec`, which compute the same thing in the same operation order. The
entry points (`ops`) choose per call, so callers never branch:

- `dfl_expectation(boxes, reg_max)`: the DFL softmax expectation over bins (the box decode input), with
  `positive_dfl(...)`, the DFL cross-entropy at positives, whose gradient is added by the expectation's own backward
  (one pass writes the dense logits gradient);
- `assign_metrics(...)`: the assigner's candidate mask, CIoU overlaps and alignment metric in one pass over the dense
  (B, n, A) pairs; `assign.task_aligned_assign` is the assignment on top of it (top-k and conflicts in torch).

Tie-breaking contract: the kernel's metric equals the spec's bit for bit (tests/test_kernels.py, on the GPU), so top-k
sees the ties the reference sees. Where top-k chooses among equal metrics, the choice is torch.topk's and may differ
between devices (as the reference's does between CPU and CUDA); ties of non-zero metric are measure-zero for real
inputs, so a changed choice only swaps positives of zero metric, hence zero target score: they carry no weight in any
loss term. (Such a positive can still take part in conflict resolution; this is the reference's behaviour too.)
"""

from __future__ import annotations

from .ops import UNAVAILABLE_REASON, assign_metrics, available, dfl_expectation, positive_dfl

__all__ = ["UNAVAILABLE_REASON", "assign_metrics", "available", "dfl_expectation", "positive_dfl"]
