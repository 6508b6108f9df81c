"""Seeded input builders shared by every benchmark, so ours and Ultralytics' criteria see the very same tensors.

Shapes from GitHub issue 5 (fp32, 640x640, strides 8/16/32, A = 8400 anchors):
  (a) batch 42, nc 1, 8 polygon vertices, about 10 objects per image;
  (b) batch 16, nc 80, about 20 objects per image.
CPU variants keep the structure but shrink everything, so CI (under --benchmark-disable) runs each code path in
milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

REG_MAX = 16
STRIDES = (8.0, 16.0, 32.0)
N_VERTICES = 8

# The cuda parameter carries the `cuda` marker, so the headguard plugin skips it cleanly where there is no GPU.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@dataclass(frozen=True)
class LossShape:
    """One loss workload: batch, classes, image size (square, pixels) and the mean number of objects per image."""

    name: str
    batch: int
    nc: int
    img_size: int
    objects_per_image: int
    np: int = N_VERTICES

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [(self.img_size // int(s), self.img_size // int(s)) for s in STRIDES]

    @property
    def anchors(self) -> int:
        return sum(h * w for h, w in self.grids)


SHAPE_A = LossShape("a", batch=42, nc=1, img_size=640, objects_per_image=10)
SHAPE_B = LossShape("b", batch=16, nc=80, img_size=640, objects_per_image=20)
# CPU stand-ins: the same nc and vertex count, a 64 px image (84 anchors) and a handful of objects.
SHAPE_A_CPU = LossShape("a", batch=3, nc=1, img_size=64, objects_per_image=3)
SHAPE_B_CPU = LossShape("b", batch=2, nc=80, img_size=64, objects_per_image=4)


def loss_shape(name: str, device: str) -> LossShape:
    """The issue's shape on CUDA, its tiny stand-in on the CPU."""
    table = {"a": (SHAPE_A, SHAPE_A_CPU), "b": (SHAPE_B, SHAPE_B_CPU)}
    full, tiny = table[name]
    return full if device == "cuda" else tiny


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(shape: LossShape, device: str, seed: int = 0, polygons: bool = True) -> dict[str, torch.Tensor]:
    """Targets as the losses take them: batch_idx (N,), cls (N, 1), bboxes (N, 4) normalised xywh, polygons (N, np, 2).

    Object counts vary per image around the mean (uniform in [mean/2, 3*mean/2]), so the padded target tensor has
    empty slots as in real batches. Each polygon is a star-shaped ring of `np` vertices, counter-clockwise, inside its
    box; boxes are the polygons' bounding boxes, so box and polygon targets agree.
    """
    g = generator(seed)
    lo, hi = max(1, shape.objects_per_image // 2), shape.objects_per_image * 3 // 2
    counts = torch.randint(lo, hi + 1, (shape.batch,), generator=g)
    n = int(counts.sum())
    batch_idx = torch.repeat_interleave(torch.arange(shape.batch), counts).float()
    cls = torch.randint(0, shape.nc, (n, 1), generator=g).float()
    centre = 0.15 + 0.7 * torch.rand(n, 1, 2, generator=g)
    half = 0.01 + 0.12 * torch.rand(n, 1, 2, generator=g)
    angle = torch.arange(shape.np) * (2 * math.pi / shape.np) + 0.3 * torch.rand(n, shape.np, generator=g)
    radius = 0.6 + 0.4 * torch.rand(n, shape.np, generator=g)
    ring = torch.stack((angle.cos(), angle.sin()), -1) * radius.unsqueeze(-1)
    poly = (centre + half * ring).clamp(0.0, 1.0)
    xy_min, xy_max = poly.amin(1), poly.amax(1)
    bboxes = torch.cat(((xy_min + xy_max) / 2, xy_max - xy_min), 1)
    batch = {"batch_idx": batch_idx, "cls": cls, "bboxes": bboxes}
    if polygons:
        batch["polygons"] = poly
    return {k: v.to(device) for k, v in batch.items()}


def make_preds(
    shape: LossShape, device: str, seed: int = 1, polygons: bool = True, requires_grad: bool = True
) -> dict[str, object]:
    """A head's training output without running a head: leaf tensors with gradients, as a loss benchmark needs.

    Class logits sit near an initialised head's prior (about -5), boxes and vertex offsets are small random logits.
    `feats` are zero-stride expanded views: they carry the level shapes the losses read and cost no memory.
    """
    g = generator(seed)
    b, a = shape.batch, shape.anchors
    boxes = torch.randn(b, 4 * REG_MAX, a, generator=g)
    scores = torch.randn(b, shape.nc, a, generator=g) - 5.0
    preds: dict[str, object] = {"boxes": boxes, "scores": scores}
    if polygons:
        preds["polygons"] = 0.5 * torch.randn(b, 2 * shape.np, a, generator=g)
    for key in list(preds):
        preds[key] = preds[key].to(device).requires_grad_(requires_grad)
    channels = shape.nc + 4 * REG_MAX
    preds["feats"] = [torch.zeros((), device=device).expand(b, channels, h, w) for h, w in shape.grids]
    return preds


def clear_grads(preds: dict[str, object]) -> None:
    """Drop accumulated gradients (outside the timed region), so each round's backward writes fresh ones."""
    for value in preds.values():
        if isinstance(value, torch.Tensor):
            value.grad = None


@dataclass(frozen=True)
class HeadShape:
    """One head workload: backbone channels per level, batch and image size."""

    name: str
    channels: tuple[int, int, int]
    batch: int
    img_size: int


HEAD_CHANNELS = {"n": (64, 128, 256), "s": (128, 256, 512)}


def head_shape(size: str, device: str) -> HeadShape:
    """yolo11n-like or yolo11s-like channels; batch 16 at 640 px on CUDA, batch 1 at 64 px on the CPU."""
    batch, img = (16, 640) if device == "cuda" else (1, 64)
    return HeadShape(size, HEAD_CHANNELS[size], batch, img)


def make_features(shape: HeadShape, device: str, seed: int = 2) -> list[torch.Tensor]:
    """Backbone feature maps (B, C_i, img/stride_i, img/stride_i), standard normal."""
    g = generator(seed)
    feats = []
    for c, s in zip(shape.channels, STRIDES):
        side = shape.img_size // int(s)
        feats.append(torch.randn(shape.batch, c, side, side, generator=g).to(device))
    return feats


def make_polygon_pairs(n: int, np: int, device: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` (pred, target) polygon pairs of `np` vertices each, (n, np, 2), targets ccw rings, preds jittered copies."""
    g = generator(seed)
    centre = 100 * torch.rand(n, 1, 2, generator=g)
    angle = torch.arange(np) * (2 * math.pi / np) + 0.3 * torch.rand(n, np, generator=g)
    radius = 5 + 10 * torch.rand(n, np, generator=g)
    target = centre + torch.stack((angle.cos(), angle.sin()), -1) * radius.unsqueeze(-1)
    pred = target + 2.0 * torch.randn(n, np, 2, generator=g)
    return pred.to(device), target.to(device)


def make_assigner_inputs(shape: LossShape, device: str, seed: int = 4) -> dict[str, torch.Tensor]:
    """The assigner's inputs at a loss shape, in pixels: what a loss passes it after decoding one batch.

    pd_scores (B, A, nc) probabilities, pd_bboxes (B, A, 4) xyxy boxes around their anchors, anchor_points (A, 2),
    gt_labels (B, n, 1), gt_bboxes (B, n, 4) xyxy, mask_gt (B, n, 1) 0/1 with n the largest per-image object count.
    """
    g = generator(seed)
    points, strides = [], []
    for (h, w), s in zip(shape.grids, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        points.append(torch.stack((xs, ys), -1).reshape(-1, 2) * s)
        strides.append(torch.full((h * w, 1), s))
    anchors, stride = torch.cat(points), torch.cat(strides)
    b, a = shape.batch, shape.anchors
    half = stride * (0.5 + 3 * torch.rand(b, a, 2, generator=g))
    pd_bboxes = torch.cat((anchors - half, anchors + half), -1)
    pd_scores = torch.sigmoid(torch.randn(b, a, shape.nc, generator=g) - 3.0)

    batch = make_batch(shape, "cpu", seed=seed, polygons=False)
    idx = batch["batch_idx"].long()
    counts = torch.bincount(idx, minlength=b)
    n = int(counts.max())
    slot = torch.arange(idx.numel()) - (torch.cumsum(counts, 0) - counts)[idx]
    xywh = batch["bboxes"] * shape.img_size
    gt_bboxes = torch.zeros(b, n, 4)
    gt_bboxes[idx, slot] = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
    gt_labels = torch.zeros(b, n, 1)
    gt_labels[idx, slot] = batch["cls"]
    mask_gt = torch.zeros(b, n, 1)  # float 0/1, as both losses compute it
    mask_gt[idx, slot] = 1.0
    out = dict(pd_scores=pd_scores, pd_bboxes=pd_bboxes, anchor_points=anchors, gt_labels=gt_labels,
               gt_bboxes=gt_bboxes, mask_gt=mask_gt)
    return {k: v.to(device) for k, v in out.items()}
