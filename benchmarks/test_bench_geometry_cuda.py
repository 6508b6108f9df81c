"""MGIoU on 100k polygon pairs (8 vertices) and the task-aligned assigner alone, ours and Ultralytics' side by side."""

from __future__ import annotations

import pytest

from benchmarks._inputs import DEVICES, N_VERTICES, STRIDES, loss_shape, make_assigner_inputs, make_polygon_pairs

losses = pytest.importorskip("losses")

MGIOU_PAIRS = {"cuda": 100_000, "cpu": 64}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_mgiou(device_bench, device, mode):
    n = MGIOU_PAIRS[device]
    pred, target = make_polygon_pairs(n, N_VERTICES, device)
    pred.requires_grad_(mode == "fwd_bwd")

    def forward():
        return losses.mgiou(pred, target)

    def forward_backward():
        losses.mgiou(pred, target).sum().backward()

    def drop_grads():
        pred.grad = None

    device_bench(forward if mode == "fwd" else forward_backward, setup=drop_grads, pairs=n, vertices=N_VERTICES)
    out = losses.mgiou(pred, target)
    assert out.shape == (n,) and bool(((out >= 0) & (out <= 1)).all())


def _ours(inputs):
    return losses.task_aligned_assign(**inputs, strides=STRIDES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
@pytest.mark.parametrize("impl", ["headguard", "ultralytics"])
def test_assigner(device_bench, device, shape_name, impl):
    shape = loss_shape(shape_name, device)
    inputs = make_assigner_inputs(shape, device)
    if impl == "ultralytics":
        pytest.importorskip("ultralytics")
        from ultralytics.utils.tal import TaskAlignedAssigner

        assigner = TaskAlignedAssigner(topk=10, num_classes=shape.nc, alpha=0.5, beta=6.0, stride=list(STRIDES))

        def assign():
            return assigner(*inputs.values())
    else:
        def assign():
            return _ours(inputs)

    device_bench(assign, pair=f"assign-{shape_name}", impl=impl, batch=shape.batch, nc=shape.nc)
    fg_mask = assign()[3]
    assert fg_mask.shape == (shape.batch, shape.anchors) and bool(fg_mask.any())
