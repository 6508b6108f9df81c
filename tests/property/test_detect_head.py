"""Reference Detect head: output contract, decoding, bias priors, input validation, no side effects on inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads import Detect
from heads._blocks import DFL
from heads._decode import decode_polygons, dfl_expectation, dist2bbox, make_anchors

CH = (8, 16, 32)
STRIDES = (8.0, 16.0, 32.0)


def _head(nc=3, reg_max=16):
    head = Detect(nc=nc, reg_max=reg_max, ch=CH)
    head.stride = torch.tensor(STRIDES)
    head.bias_init()
    return head


def _feats(batch, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // int(s), size // int(s), generator=gen) for c, s in zip(CH, STRIDES)]


@given(nc=st.integers(1, 5), reg_max=st.sampled_from([2, 8, 16]), batch=st.integers(1, 3), size=st.sampled_from([64, 96]))
def test_training_and_eval_shapes(nc, reg_max, batch, size):
    head = _head(nc, reg_max)
    feats = _feats(batch, size)
    anchors = sum((size // int(s)) ** 2 for s in STRIDES)
    out = head.train()(feats)
    assert out["boxes"].shape == (batch, 4 * reg_max, anchors)
    assert out["scores"].shape == (batch, nc, anchors)
    assert all(a is b for a, b in zip(out["feats"], feats))
    y, preds = head.eval()(feats)
    assert y.shape == (batch, 4 + nc, anchors)
    assert set(preds) == {"boxes", "scores", "feats"}


@given(seed=st.integers(0, 1000), size=st.sampled_from([64, 96]))
def test_eval_decode_is_make_anchors_dfl_dist2bbox(seed, size):
    head = _head().eval()
    feats = _feats(2, size, seed)
    y, preds = head(feats)
    anchors, strides = make_anchors(feats, head.stride)
    dist = dfl_expectation(preds["boxes"])
    boxes = dist2bbox(dist, anchors.t().unsqueeze(0), xywh=True, dim=1) * strides.t()
    torch.testing.assert_close(y[:, :4], boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[:, 4:], preds["scores"].sigmoid())
    assert bool((y[:, 2:4] >= 0).all()), "decoded widths/heights must be non-negative"


def test_forward_does_not_modify_inputs():
    head = _head()
    feats = _feats(2, 64)
    before = [f.clone() for f in feats]
    head.train()(feats)
    head.eval()(feats)
    for a, b in zip(feats, before):
        assert torch.equal(a, b)


def test_make_anchors_are_cell_centres_in_grid_units():
    feats = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 1)]
    points, strides = make_anchors(feats, [8.0, 16.0])
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]]
    assert points.tolist() == expected
    assert strides.view(-1).tolist() == [8.0] * 6 + [16.0]


@given(seed=st.integers(0, 1000), reg_max=st.sampled_from([2, 4, 16]))
def test_dfl_module_equals_dfl_expectation(seed, reg_max):
    x = torch.randn(2, 4 * reg_max, 7, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(DFL(reg_max)(x), dfl_expectation(x), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in DFL(reg_max).parameters())


def test_dfl_expectation_gradient_is_exact():
    x = torch.randn(2, 4 * 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dfl_expectation(t), (x,))


def test_decode_polygons_formula_and_fp32():
    raw = torch.tensor([[[1.0], [-0.5]]], dtype=torch.float16)  # one vertex (x, y), one anchor
    out = decode_polygons(raw, torch.tensor([[2.5, 3.5]]), torch.tensor([[32.0]]))
    assert out.dtype == torch.float32
    assert out.view(-1).tolist() == [(2 * 1.0 + 2.5 - 0.5) * 32, (2 * -0.5 + 3.5 - 0.5) * 32]
    big = decode_polygons(torch.full((1, 2, 1), 1000.0, dtype=torch.float16), torch.zeros(1, 2), torch.full((1, 1), 32.0))
    assert bool(torch.isfinite(big).all())


@given(img_size=st.sampled_from([320, 640, 1280]), objects=st.floats(0.5, 50), nc=st.integers(1, 100))
def test_bias_init_sets_the_configured_prior(img_size, objects, nc):
    head = Detect(nc=nc, ch=CH)
    head.stride = torch.tensor(STRIDES)
    head.bias_init(box_bias=1.5, img_size=img_size, objects_per_image=objects)
    for level in range(head.nl):
        prior = head.class_prior(level, img_size=img_size, objects_per_image=objects)
        assert prior == pytest.approx(objects / nc / (img_size / STRIDES[level]) ** 2)
        bias = head.cv3[level][-1].bias
        torch.testing.assert_close(bias, torch.full_like(bias, math.log(prior)))
        assert bool((head.cv2[level][-1].bias == 1.5).all())


def test_bias_init_defaults_match_ultralytics_constants():
    head = _head(nc=80)
    assert head.cv3[0][-1].bias[0].item() == pytest.approx(math.log(5 / 80 / (640 / 8) ** 2))
    assert head.cv2[2][-1].bias[0].item() == 2.0


def test_bias_init_without_strides_raises():
    head = Detect(nc=2, ch=CH)
    with pytest.raises(ValueError, match=r"strides are unset.*set head.stride \(one positive value per level"):
        head.bias_init()
    with pytest.raises(ValueError, match="strides are unset"):
        head.eval()(_feats(1, 64))


@pytest.mark.parametrize(
    "feats, match",
    [
        (lambda: _feats(1, 64)[:2], r"got 2 levels; expected a list of 3 feature maps"),
        (lambda: [torch.zeros(1, 9, 8, 8), *_feats(1, 64)[1:]], r"x\[0\] has 9 channels; expected ch\[0\] = 8"),
        (lambda: [torch.zeros(8, 8, 8), *_feats(1, 64)[1:]], r"x\[0\] has shape \(8, 8, 8\); expected a 4-D"),
        (lambda: [*_feats(1, 64)[:2], torch.zeros(2, 32, 2, 2)], r"x\[2\] has batch size 2; expected 1"),
        (lambda: torch.zeros(1, 8, 8, 8), r"got a Tensor; expected a list of 3"),
    ],
)
def test_bad_inputs_raise_clear_errors(feats, match):
    with pytest.raises(ValueError, match=match):
        _head()(feats())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nc=0, ch=CH), "positive int for nc, got nc=0"),
        (dict(nc=True, ch=CH), "positive int for nc, got nc=True"),
        (dict(nc=2, ch=()), r"non-empty sequence of positive ints .*got ch=\(\)"),
        (dict(nc=2, ch=(8, True)), r"positive ints .*got ch=\(8, True\)"),
        (dict(nc=2, reg_max=0, ch=CH), "positive int for reg_max, got reg_max=0"),
        (dict(nc=2, reg_max=True, ch=CH), "positive int for reg_max, got reg_max=True"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Detect(**kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_anchors([torch.zeros(1, 1, 2, 2)] * 2, [8.0]), "got 2 feature maps but 1 strides"),
        (lambda: dfl_expectation(torch.zeros(1, 30, 5), reg_max=8), "got 30 channels; expected 4 \\* reg_max = 32"),
        (lambda: dfl_expectation(torch.zeros(1, 30, 5)), "got 30 channels; expected 4 \\* reg_max = 28"),
        (lambda: decode_polygons(torch.zeros(1, 5, 3), torch.zeros(3, 2), torch.ones(3, 1)), "got 5 channels; .*even"),
    ],
)
def test_decode_functions_reject_mismatched_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
