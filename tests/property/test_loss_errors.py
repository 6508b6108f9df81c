"""Every bad input to DetectionLoss raises LossInputError naming the tensor, what was found and what was expected."""

from __future__ import annotations

import pytest
import torch

from losses import DetectionLoss, LossInputError

STRIDES = (8.0, 16.0, 32.0)


def _good(batch=2, nc=2):
    gen = torch.Generator().manual_seed(0)
    feats = [torch.zeros(batch, 1, 64 // int(s), 64 // int(s)) for s in STRIDES]
    preds = {"boxes": torch.randn(batch, 64, 84, generator=gen), "scores": torch.randn(batch, nc, 84, generator=gen), "feats": feats}
    data = {
        "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [0.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4], [0.7, 0.6, 0.3, 0.3]]),
    }
    return preds, data


def _nan_scores(p, b):
    p["scores"][0, 0, 17] = float("nan")
    p["scores"][1, 1, 3] = float("inf")
    p["scores"][1, 0, 5] = float("-inf")


def _set(where, key, value):
    def edit(p, b):
        (p if where == "p" else b)[key] = value(p, b)

    return edit


CASES = {
    "nan-scores": (_nan_scores, r"preds\['scores'\] has 3 non-finite values \(first at \[0, 0, 17\]\); expected finite "
                   r"logits — the head produced NaN/Inf, fix the head rather than masking"),
    "inf-boxes": (lambda p, b: p["boxes"].__setitem__((1, 2, 3), float("inf")),
                  r"preds\['boxes'\] has 1 non-finite values \(first at \[1, 2, 3\]\)"),
    "scores-nc": (_set("p", "scores", lambda p, b: torch.zeros(2, 3, 84)),
                  r"preds\['scores'\] has shape \(2, 3, 84\); expected \(\*, 2, \*\) \(B, nc=2, A\)"),
    "scores-anchors": (_set("p", "scores", lambda p, b: torch.zeros(2, 2, 80)),
                       r"preds\['scores'\] has shape \(2, 2, 80\); expected \(2, 2, 84\) \(B, nc, A\) with A = 84"),
    "boxes-reg-max": (_set("p", "boxes", lambda p, b: torch.zeros(2, 32, 84)),
                      r"preds\['boxes'\] has shape \(2, 32, 84\); expected \(2, 64, 84\) .*reg_max=16"),
    "levels": (_set("p", "feats", lambda p, b: p["feats"][:2]), r"preds\['feats'\] has 2 levels; expected a list of 3"),
    "missing-key": (lambda p, b: p.pop("feats"), r"preds has no 'feats' entry"),
    "int-scores": (_set("p", "scores", lambda p, b: torch.zeros(2, 2, 84, dtype=torch.long)),
                   r"preds\['scores'\] has dtype torch.int64; expected a floating-point tensor"),
    "dtype-mismatch": (_set("p", "boxes", lambda p, b: p["boxes"].double()),
                       r"preds\['boxes'\] has dtype torch.float64; expected torch.float32, the dtype of preds\['scores'\]"),
    "class-out-of-range": (_set("b", "cls", lambda p, b: torch.tensor([[0.0], [2.0], [0.0]])),
                           r"batch\['cls'\] has 1 values outside \[0, 2\) \(first at row 1: \[2.0\]\); expected class ids in \[0, 2\) for nc=2"),
    "negative-class": (_set("b", "cls", lambda p, b: torch.tensor([[-1.0], [0.0], [0.0]])), r"batch\['cls'\] has 1 values outside"),
    "fractional-class": (_set("b", "cls", lambda p, b: torch.tensor([[0.5], [0.0], [0.0]])),
                         r"batch\['cls'\] has non-integer values \(first at row 0: \[0.5\]\); expected integer ids"),
    "batch-idx-out-of-range": (_set("b", "batch_idx", lambda p, b: torch.tensor([0.0, 1.0, 2.0])),
                               r"batch\['batch_idx'\] has 1 values outside \[0, 2\) \(first at row 2: \[2.0\]\); expected image indices in \[0, 2\)"),
    "negative-size": (_set("b", "bboxes", lambda p, b: torch.tensor([[0.5, 0.5, -0.2, 0.2], [0.3, 0.3, 0.1, 0.4], [0.7, 0.6, 0.3, 0.3]])),
                      r"batch\['bboxes'\]\[:, 2:\] \(w, h\) has 1 values outside \[0, inf\) \(first at row 0: \[-0.2.*expected non-negative box sizes"),
    "nan-box": (_set("b", "bboxes", lambda p, b: torch.tensor([[0.5, float("nan"), 0.2, 0.2], [0.3, 0.3, 0.1, 0.4], [0.7, 0.6, 0.3, 0.3]])),
                r"batch\['bboxes'\] has 1 non-finite values \(first at \[0, 1\]\); expected finite normalised xywh boxes"),
    "pixel-boxes": (_set("b", "bboxes", lambda p, b: b["bboxes"] * 64),
                    r"batch\['bboxes'\] has 12 values outside \[-1, 2\] \(largest 44.8, first at row 0: \[32.0, 32.0, "
                    r"12.8.*\]\); expected normalised xywh in \[0, 1\] .*; values up to 44.8 look like pixels of the "
                    r"64x64 image: divide by the image size"),
    "huge-scores": (lambda p, b: p["scores"].__setitem__((1, 0, 9), 2e15),
                    r"preds\['scores'\] has 1 values outside \[-1e\+15, 1e\+15\] \(largest 2e\+15, first at \[1, 0, 9\]\); "
                    r"expected logits in \[-1e\+15, 1e\+15\], where the loss is guaranteed finite in float32"),
    "bboxes-shape": (_set("b", "bboxes", lambda p, b: torch.zeros(3, 5)),
                     r"batch\['bboxes'\] has shape \(3, 5\); expected \(3, 4\) \(N, 4\) normalised xywh"),
    "cls-count": (_set("b", "cls", lambda p, b: torch.zeros(2, 1)),
                  r"batch\['cls'\] has shape \(2, 1\); expected \(3, 1\) \(N, 1\) with N = 3 from batch\['batch_idx'\]"),
    "batch-idx-2d": (_set("b", "batch_idx", lambda p, b: torch.zeros(3, 1)), r"batch\['batch_idx'\] has shape \(3, 1\); expected \(\*\)"),
    "device-mismatch": (_set("b", "bboxes", lambda p, b: b["bboxes"].to("meta")),
                        r"batch\['bboxes'\] is on meta; expected cpu, the device of preds\['scores'\]"),
    "batch-missing": (lambda p, b: b.pop("cls"), r"batch has no 'cls' entry"),
    "not-a-tensor": (_set("b", "bboxes", lambda p, b: [[0.5, 0.5, 0.2, 0.2]] * 3), r"batch\['bboxes'\] is a list; expected a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_clear_error(case):
    edit, match = CASES[case]
    preds, batch = _good()
    edit(preds, batch)
    with pytest.raises(LossInputError, match=match):
        DetectionLoss(2, STRIDES)(preds, batch)


def test_good_input_passes_and_error_is_a_value_error():
    preds, batch = _good()
    DetectionLoss(2, STRIDES)(preds, batch)
    assert issubclass(LossInputError, ValueError)


def test_preds_of_wrong_type():
    with pytest.raises(LossInputError, match="preds is a list; expected the head's dict"):
        DetectionLoss(2, STRIDES)([torch.zeros(1)], _good()[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nc=0, strides=STRIDES), "nc is 0; expected a positive int"),
        (dict(nc=True, strides=STRIDES), "nc is True; expected a positive int"),
        (dict(nc=2, strides=STRIDES, reg_max=True), r"reg_max is True; expected an int >= 2"),
        (dict(nc=2, strides=(0.0, 0.0, 0.0)), r"strides is \[0.0, 0.0, 0.0\]; expected one positive stride per level"),
        (dict(nc=2, strides=STRIDES, reg_max=1), "reg_max is 1; expected an int >= 2"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectionLoss(**kwargs)
