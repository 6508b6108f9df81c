"""task_aligned_assign equals Ultralytics 8.4.190's TaskAlignedAssigner (topk 10, alpha 0.5, beta 6)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads._decode import make_anchors
from losses import task_aligned_assign
from losses._boxes import xywh2xyxy

from . import _ultralytics  # noqa: F401  (skips the module when Ultralytics is missing)
from ultralytics.utils.tal import TaskAlignedAssigner  # noqa: E402


@pytest.mark.parametrize("strides", [(8.0, 16.0, 32.0), (8.0, 16.0), (16.0,)], ids=["3-levels", "2-levels", "1-level"])
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    nc=st.sampled_from([1, 3]),
    counts=st.lists(st.integers(0, 5), min_size=3, max_size=3),
)
def test_assignment_equals_ultralytics(strides, seed, batch, nc, counts):
    gen = torch.Generator().manual_seed(seed)
    size = 128
    points, stride_t = make_anchors([torch.zeros(1, 1, size // int(s), size // int(s)) for s in strides], strides)
    anchors = points * stride_t
    a, counts = anchors.shape[0], counts[:batch]
    n = max(counts)
    mask_gt = (torch.arange(n).view(1, n) < torch.tensor(counts).view(batch, 1)).unsqueeze(-1)
    boxes = xywh2xyxy(torch.cat((torch.rand(batch, n, 2, generator=gen) * 0.9 + 0.05, torch.rand(batch, n, 2, generator=gen) ** 2 * 0.6), -1) * size)
    boxes = boxes * mask_gt
    labels = (torch.randint(0, nc, (batch, n, 1), generator=gen) * mask_gt).float()
    ltrb = torch.rand(batch, a, 4, generator=gen) * 30
    pd_bboxes = torch.cat((anchors - ltrb[..., :2], anchors + ltrb[..., 2:]), -1)
    pd_scores = torch.rand(batch, a, nc, generator=gen)

    ours = task_aligned_assign(pd_scores, pd_bboxes, anchors, labels, boxes, mask_gt, strides)
    ref = TaskAlignedAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0, stride=list(strides))(
        pd_scores, pd_bboxes, anchors, labels, boxes, mask_gt.float()
    )
    names = ("target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx")
    for name, y in zip(names, ref):
        x = getattr(ours, name)
        if n == 0 and name in ("target_labels", "target_gt_idx"):
            y = y.long()
        torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
