"""The fused kernels (`losses._kernels`) side by side with the torch ops they replace, at the issue's shapes (a), (b).

Each workload is timed as impl "reference" (the torch ops the kernel replaces) and impl "kernel" (the entry point in
`losses._kernels`, which runs the Triton kernel on CUDA), with `pair` = "kernel-<workload>-<shape>":
  * assign-metrics: candidate test + CIoU + metric over the dense (B, n, A) pairs;
  * assign: the whole task-aligned assignment as the losses run it on CUDA (the metric chain fused, top-k and
    conflicts in torch), impl "kernel" only;
  * dfl: forward+backward of the DFL expectation over all anchors plus the DFL cross-entropy at the positives.
The losses themselves, whose CUDA default has these kernels in its core, are timed in test_bench_losses_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._inputs import DEVICES, REG_MAX, STRIDES, loss_shape, make_assigner_inputs
from benchmarks._inputs import generator, make_preds
from heads._decode import dfl_expectation as reference_expectation
from losses._boxes import dfl_loss
from losses._fast import gather_anchors
from losses._kernels import assign_metrics
from losses._kernels import dfl_expectation as fused_expectation
from losses.assigner import AssignerConfig, _anchors_in_boxes, _metrics, task_aligned_assign

IMPLS = ["reference", "kernel"]
# "eager": each call from Python (host time included, as a loss step sees it without graphs); "graph": the same
# work captured once as a CUDA graph and replayed, so the time is the GPU's (what a CUDA-graphed loss step sees).
MODES = ["eager", "graph"]
POSITIVES_PER_OBJECT = 5  # about what the assigner keeps per gt at these shapes


def _timed(fn, mode: str, device: str):
    """`fn` itself, or (mode "graph" on CUDA) a replay of `fn` captured as a CUDA graph."""
    if mode == "eager" or device != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile kernels and fill the allocator before capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _assigner_args(shape_name, device):
    shape = loss_shape(shape_name, device)
    inputs = make_assigner_inputs(shape, device)
    return shape, inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_assign_metrics(device_bench, device, shape_name, impl, mode):
    shape, x = _assigner_args(shape_name, device)
    cfg = AssignerConfig()
    mask = x["mask_gt"].bool()
    labels = x["gt_labels"].long().squeeze(-1)

    def reference():
        candidate = _anchors_in_boxes(x["anchor_points"], x["gt_bboxes"], mask, STRIDES[1]) & mask
        return _metrics(x["pd_scores"], x["pd_bboxes"], labels, x["gt_bboxes"], candidate, cfg, dense=True)

    def kernel():
        return assign_metrics(x["pd_scores"], x["pd_bboxes"], x["anchor_points"], labels, x["gt_bboxes"],
                              mask.squeeze(-1), STRIDES[1], cfg.alpha, cfg.beta)

    with torch.no_grad():
        got, want = kernel(), reference()
        fn = _timed(reference if impl == "reference" else kernel, mode, device)
        device_bench(fn, pair=f"kernel-assign-metrics-{shape_name}", impl=f"{impl}[{mode}]",
                     pairs=int(mask.numel()) * x["pd_scores"].shape[1],
                     overlaps_bitwise_equal=float((got[1] == want[0]).float().mean()),
                     align_bitwise_equal=float((got[2] == want[1]).float().mean()),
                     overlaps_max_abs_diff=float((got[1] - want[0]).abs().max()),
                     align_max_abs_diff=float((got[2] - want[1]).abs().max()))
    assert torch.allclose(got[1], want[0], rtol=1e-5, atol=1e-6) and torch.allclose(got[2], want[1], rtol=1e-5,
                                                                                    atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
@pytest.mark.parametrize("mode", MODES)
def test_assign(device_bench, device, shape_name, mode):
    """The whole assignment as the losses run it on CUDA: the fused metric chain, top-k and conflicts in torch."""
    _, x = _assigner_args(shape_name, device)
    device_bench(_timed(lambda: task_aligned_assign(*x.values(), STRIDES), mode, device),
                 pair=f"kernel-assign-{shape_name}", impl=f"kernel[{mode}]")
    assert task_aligned_assign(*x.values(), STRIDES).fg_mask.any()


def _dfl_inputs(shape_name, device):
    shape = loss_shape(shape_name, device)
    logits = make_preds(shape, device, polygons=False)["boxes"]
    b, _, a = logits.shape
    g = generator(5)
    k = min(b * a, shape.batch * shape.objects_per_image * POSITIVES_PER_OBJECT)
    flat = torch.randperm(b * a, generator=g)[:k].sort().values
    image, anchor = (flat // a).to(device), (flat % a).to(device)
    target = ((REG_MAX - 1) * torch.rand(k, 4, generator=g)).to(device)
    grad = torch.randn(b, 4, a, generator=g).to(device)
    weight = torch.rand(k, generator=g).to(device)
    return logits, image, anchor, target, grad, weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", ["a", "b"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_dfl_fwd_bwd(device_bench, device, shape_name, impl, mode):
    """Expectation over all anchors and the DFL at positives, forward and backward into the logits."""
    logits, image, anchor, target, grad, weight = _dfl_inputs(shape_name, device)

    def reference():
        expectation = reference_expectation(logits, REG_MAX)
        positive = dfl_loss(gather_anchors(logits, image, anchor).view(-1, 4, REG_MAX), target)
        return torch.autograd.grad((expectation * grad).sum() + (positive * weight).sum(), logits)[0]

    def kernel():
        branch = fused_expectation(logits, REG_MAX)
        positive = branch.positive_loss(image, anchor, target)
        return torch.autograd.grad((branch.expectation * grad).sum() + (positive * weight).sum(), logits)[0]

    device_bench(_timed(reference if impl == "reference" else kernel, mode, device), pair=f"kernel-dfl-{shape_name}",
                 impl=f"{impl}[{mode}]", positives=int(image.numel()))
    assert torch.isfinite(kernel()).all()
