"""The value ranges the reference losses accept, and why every loss is finite inside them.

Rule: a finite input never gives a non-finite loss without an error. Each range below is checked with the tensor's
finiteness, in the same fused reduction (`aminmax`), and a value outside raises `LossInputError` naming the tensor,
what was found and the bound.

Targets (normalised, 1 = the image's width or height): every value of `batch['bboxes']` (xywh) and every REAL vertex
of `batch['polygons']` (xy; padded vertices are never read, so never checked) lies in [TARGET_LOW, TARGET_HIGH] =
[-1, 2]. Up to one image size outside the image is accepted: mosaic and perspective augmentation move objects partly
or wholly off the image before clipping, and such boxes are valid (the assigner finds no anchor outside the image;
`headguard.strategies` draws centres at -0.2 and 1.5 on purpose). Coordinates in pixels are rejected whenever one
value exceeds 2, i.e. for every box or polygon of an image wider than 2 px except those inside its top-left corner:
the common mistake of passing pixels (box and DFL terms silently 0, a polygon term in the 1e5) is caught.

Predictions (raw head outputs; fp16 is always inside, bf16 and fp32 need not be):

- class logits `preds['scores']` and box/DFL bin logits `preds['boxes']`: |x| <= LOGIT_BOUND = 1e15;
- raw vertex offsets `preds['polygons']`: |x| <= VERTEX_OFFSET_BOUND = 1e6 (vertices up to 2e6 cells from their
  anchor; decode_polygons itself is finite far beyond, up to heads._decode.DECODE_RAW_BOUND).

Why the loss is finite inside (float32, the compute dtype for fp16/bf16/fp32 predictions; float64 has more room).
Assumptions: B <= 2^12 images, B*A <= 2^31 anchors, nc <= 2^12 classes, gains <= 1e3, image sides <= 1e5 cells of
the finest level (G). Each term is a sum of per-element values, divided by max(1, target-score sum) >= 1, times its
gain, and the returned vector is times B; float32 overflows above 3.4e38.

- class BCE per element <= |x| + log 2: B * gain * B*A*nc * (1e15 + 1) <= 4096 * 1e3 * 2^43 * 1e15 ~ 3.6e34;
- DFL per anchor <= 2 * 1e15 + log(reg_max) (log-softmax of bins within 2e15 of each other):
  4096 * 1e3 * 2^31 * 2e15 ~ 1.8e31; the CIoU term is bounded (decoded boxes lie within reg_max bins of the anchor);
- vertex L2 per anchor <= 2 * (2 * 1e6 + 3G)^2 / AREA_EPS (a zero-area box, AREA_EPS = 1e-9; targets within
  [-1, 2] are within 2G cells): 4096 * 1e3 * 2^31 * 2 * (2.3e6)^2 * 1e9 ~ 9.3e37; MGIoU is in [0, 1];
- gradients: BCE and DFL <= 2 * gain * B per logit, vertex L2 <= 4 * (2.3e6) * gain * B / AREA_EPS ~ 3.8e28.
"""

from __future__ import annotations

import torch

TARGET_LOW, TARGET_HIGH = -1.0, 2.0
LOGIT_BOUND = 1e15
VERTEX_OFFSET_BOUND = 1e6

# What the range errors say was expected.
LOGIT_RANGE = (f"logits in [-{LOGIT_BOUND:g}, {LOGIT_BOUND:g}], where the loss is guaranteed finite in float32 "
               "(losses._bounds); larger logits mean the head has diverged")
TARGET_RANGE = f"in [0, 1] (up to one image size outside the image is accepted: [{TARGET_LOW:g}, {TARGET_HIGH:g}])"


def pixel_hint(imgsz: torch.Tensor):
    """A `check_within` hint: values above the normalised range yet within the image's pixel range look like pixels."""

    def hint(smallest: float, largest: float) -> str:
        h, w = imgsz.tolist()
        if TARGET_HIGH < largest <= TARGET_HIGH * max(h, w):
            return (f"values up to {largest:g} look like pixels of the {w:g}x{h:g} image: divide by the image size "
                    "(x by its width, y by its height)")
        return ""

    return hint
