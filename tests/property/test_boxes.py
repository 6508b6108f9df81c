"""Box helpers: CIoU values and bounds, format and distance round trips, the DFL target round trip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads._decode import dfl_expectation
from losses import bbox2dist, bbox_ciou, dfl_loss, dist2bbox, xywh2xyxy, xyxy2xywh

coords = st.floats(-50, 50, allow_nan=False, width=32)
sides = st.floats(0.5, 40, allow_nan=False, width=32)


@st.composite
def xyxy_boxes(draw):
    x, y, w, h = draw(coords), draw(coords), draw(sides), draw(sides)
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float64)


def _ciou_by_hand(a, b):
    """CIoU from its definition, in Python floats (no eps)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    iou = inter / (wa * ha + wb * hb - inter)
    diag2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    centre2 = ((a[0] + a[2] - b[0] - b[2]) ** 2 + (a[1] + a[3] - b[1] - b[3]) ** 2) / 4
    v = 4 / math.pi**2 * (math.atan(wb / hb) - math.atan(wa / ha)) ** 2
    return iou - centre2 / diag2 - (v * v / (1 - iou + v) if v else 0.0)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7 - 2 / 18),  # same aspect: IoU 1/7, centre distance^2 2, diagonal^2 18
        ((0, 0, 4, 2), (0, 0, 2, 2), None),  # aspect term active
        ((0, 0, 1, 1), (5, 5, 6, 6), None),  # disjoint
    ],
)
def test_ciou_matches_hand_computation(a, b, expected):
    expected = _ciou_by_hand(a, b) if expected is None else expected
    got = bbox_ciou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_ciou_aspect_example_value():
    # IoU 0.5, centre term 1/20, v = 4/pi^2 (atan 1 - atan 2)^2, alpha = v / (0.5 + v): about 0.44675.
    got = bbox_ciou(torch.tensor([0.0, 0, 4, 2]), torch.tensor([0.0, 0, 2, 2])).item()
    assert got == pytest.approx(0.446752, abs=1e-5)


@given(a=xyxy_boxes(), b=xyxy_boxes())
def test_ciou_bounds_and_identity(a, b):
    """CIoU in (-1.5, 1]: IoU <= 1, centre term < 1, and at IoU 0 the aspect term v^2 / (1 + v) <= 1/2."""
    value = bbox_ciou(a, b).item()
    assert -1.5 < value <= 1.0 + 1e-9
    assert bbox_ciou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert value == pytest.approx(_ciou_by_hand(a.tolist(), b.tolist()), abs=1e-5)


@given(box=xyxy_boxes())
def test_xywh_xyxy_round_trip(box):
    torch.testing.assert_close(xywh2xyxy(xyxy2xywh(box)), box)


@given(
    anchor=st.tuples(coords, coords),
    dist=st.lists(st.floats(0, 30, allow_nan=False), min_size=4, max_size=4),
)
def test_dist2bbox_and_bbox2dist_are_inverse(anchor, dist):
    anchor, dist = torch.tensor(anchor, dtype=torch.float64), torch.tensor(dist, dtype=torch.float64)
    box = dist2bbox(dist, anchor, xywh=False)
    torch.testing.assert_close(bbox2dist(anchor, box), dist)
    torch.testing.assert_close(dist2bbox(dist, anchor, xywh=True), xyxy2xywh(box))


@given(target=st.floats(0, 14.98, allow_nan=False))
def test_dfl_target_round_trip(target):
    """A distance -> its two-bin DFL target distribution -> softmax expectation gives the distance back, and that
    distribution is where the DFL loss is smallest among nearby ones."""
    reg_max = 16
    anchor = torch.tensor([20.0, 20.0], dtype=torch.float64)
    box = torch.tensor([20.0 - target, 20.0, 21.0, 22.0], dtype=torch.float64)
    t = bbox2dist(anchor, box, reg_max - 1)[0]
    left = int(t)
    probs = torch.full((reg_max,), 1e-30, dtype=torch.float64)
    probs[left] += left + 1 - t
    probs[left + 1] += t - left
    logits = probs.log()
    boxes = logits.view(1, 1, reg_max, 1).expand(1, 4, reg_max, 1).reshape(1, 4 * reg_max, 1)
    assert dfl_expectation(boxes)[0, 0, 0].item() == pytest.approx(target, abs=1e-9)
    best = dfl_loss(logits.view(1, 1, -1), t.view(1, 1))
    shifted = dfl_loss(torch.roll(logits, 1).view(1, 1, -1), t.view(1, 1))
    assert best.item() < shifted.item()


def test_dfl_loss_clamps_targets_past_the_last_bin():
    logits = torch.zeros(1, 1, 16)
    assert dfl_loss(logits, torch.tensor([[40.0]])).item() == dfl_loss(logits, torch.tensor([[14.99]])).item()
