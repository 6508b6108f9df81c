"""R9 — the vertex decode (2*raw + anchor - 0.5) * stride overflows fp16 once raw is about 1,000 at stride 32; the
"fix" clamped raw outputs to +-50 at inference only, so inference and training decodes disagree."""

from __future__ import annotations

import pytest
import torch

import heads
import mutants
from heads._decode import make_anchors

CHECK = "check_decode_consistency"


def _one_anchor(raw: float, dtype: torch.dtype):
    """raw (1, 2, 1) for one vertex at the first cell of a stride-32 level; anchor (0.5, 0.5), stride 32."""
    return torch.full((1, 2, 1), raw, dtype=dtype), torch.tensor([[0.5, 0.5]]), torch.tensor([[32.0]])


def test_symptom_fp16_decode_overflows_near_raw_1000():
    assert bool(torch.isfinite(mutants.decode_polygons_in_input_dtype(*_one_anchor(1000.0, torch.float16))).all())
    overflow = mutants.decode_polygons_in_input_dtype(*_one_anchor(1024.0, torch.float16))
    assert bool(torch.isinf(overflow).all()), overflow  # 2 * 1024 * 32 = 65536 > 65504, fp16's largest value


def test_reference_decode_is_finite_and_exact_in_fp32():
    decoded = heads.decode_polygons(*_one_anchor(1024.0, torch.float16))
    assert decoded.dtype == torch.float32
    assert decoded.tolist() == [[[65536.0], [65536.0]]]


def _eval_with_vertex_bias(head_cls, bias: float):
    """Eval y and the loss's own decode (heads.decode_polygons) of the same raw outputs, cv4 final bias = bias."""
    head = head_cls(nc=2, ch=mutants.CHANNELS)
    head.stride = torch.tensor(mutants.STRIDES)
    head.bias_init()
    with torch.no_grad():
        for branch in head.cv4:
            branch[-1].bias.fill_(bias)
    feats = [torch.randn(1, c, 64 // int(s), 64 // int(s), generator=torch.Generator().manual_seed(0))
             for c, s in zip(head.ch, mutants.STRIDES)]
    head.eval()
    with torch.no_grad():
        y, preds = head(feats)
    anchors, strides = make_anchors(preds["feats"], head.stride)
    return y[:, 4 + head.nc :], heads.decode_polygons(preds["polygons"], anchors, strides)


def test_symptom_inference_clamp_disagrees_with_training_decode():
    inference, training = _eval_with_vertex_bias(mutants.PolygonClampedAtInference, 60.0)
    assert bool(torch.isfinite(inference).all())
    assert not torch.equal(inference, training)
    assert float((training - inference).abs().max()) > 100  # pixels: at least 2 * 10 raw units * stride 8


def test_reference_inference_decode_equals_training_decode():
    inference, training = _eval_with_vertex_bias(heads.Polygon, 60.0)
    assert torch.equal(inference, training)


@pytest.mark.parametrize(
    ("spec_name", "phrase"),
    [("R9_SPEC", "disagrees with the training decode"), ("R9_UNCLAMPED_SPEC", "overflows in float16")],
)
def test_check_fails_on_mutant(spec_name, phrase):
    assert phrase in mutants.failure_message(getattr(mutants, spec_name), CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
