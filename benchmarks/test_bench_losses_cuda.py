"""Loss benchmarks, forward+backward of the loss alone, fp32, at the issue's shapes (a) and (b).

Ours (DetectionLoss; PolygonLoss in l2 and mgiou mode; each as constructed with no flag, the default, and with
cuda_graphs=False, the eager reference) and Ultralytics' v8DetectionLoss get the very same prediction and target
tensors; each benchmark is tagged with `pair` = "loss-<shape>", so the ratio table lines them up. impl is the loss
kind for the default path ("detection"; on CUDA the fast path: one sync, fused kernels, CUDA graphs) and
"<kind>[eager]" for the reference path.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._inputs import DEVICES, REG_MAX, STRIDES, clear_grads, loss_shape, make_batch, make_preds

losses = pytest.importorskip("losses")

OURS = ["detection", "polygon-l2", "polygon-mgiou"]


def _our_loss(kind: str, nc: int, np: int, path: str):
    """Path "default" passes no cuda_graphs (what a user gets), "eager" passes cuda_graphs=False."""
    options = {} if path == "default" else {"cuda_graphs": False}
    if kind == "detection":
        return losses.DetectionLoss(nc, STRIDES, reg_max=REG_MAX, **options)
    mode = kind.split("-", 1)[1]
    return losses.PolygonLoss(nc, STRIDES, np=np, reg_max=REG_MAX, mode=mode, **options)


def _step(criterion, preds, batch):
    """Forward and backward of the loss alone; returns the loss vector for a sanity check."""
    loss, _items = criterion(preds, batch)
    loss.sum().backward()
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
@pytest.mark.parametrize("kind", OURS)
@pytest.mark.parametrize("path", ["default", "eager"])
def test_loss_fwd_bwd(device_bench, device, shape_name, kind, path):
    """path "default": no flag (the fast path on the GPU, the reference on the CPU); "eager": cuda_graphs=False."""
    shape = loss_shape(shape_name, device)
    polygons = kind != "detection"
    criterion = _our_loss(kind, shape.nc, shape.np, path)
    preds = make_preds(shape, device, polygons=polygons)
    batch = make_batch(shape, device, polygons=polygons)
    device_bench(
        lambda: _step(criterion, preds, batch), setup=lambda: clear_grads(preds),
        pair=f"loss-{shape_name}", impl=kind if path == "default" else f"{kind}[eager]", batch=shape.batch,
        nc=shape.nc, objects=int(batch["cls"].shape[0]),
    )
    assert torch.isfinite(_step(criterion, preds, batch)).all()
    if device == "cuda" and path == "default":  # the number is the fast path's, not a silent fallback's
        assert criterion._fast is not None and criterion._fast.core.disabled_reason is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
def test_ultralytics_loss_fwd_bwd(device_bench, device, shape_name):
    pytest.importorskip("ultralytics")
    from headguard.adapters.ultralytics import v8_detection_loss

    shape = loss_shape(shape_name, device)
    criterion = v8_detection_loss(shape.nc, STRIDES, REG_MAX, device=device)
    # The polygon key is in the dict as for our PolygonLoss; Ultralytics ignores it, so inputs are the same.
    preds = make_preds(shape, device, polygons=True)
    batch = make_batch(shape, device, polygons=True)
    device_bench(
        lambda: _step(criterion, preds, batch), setup=lambda: clear_grads(preds),
        pair=f"loss-{shape_name}", impl="ultralytics", batch=shape.batch, nc=shape.nc,
        objects=int(batch["cls"].shape[0]),
    )
    assert torch.isfinite(_step(criterion, preds, batch)).all()
