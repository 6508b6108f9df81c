"""heads.Polygon: output contract, one exact vertex decode, init that leaves polygons spread out near their anchors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from heads import Polygon, decode_polygons
from heads._decode import make_anchors
from heads.polygon import DECODE_RAW_BOUND

STRIDES = {1: [16.0], 2: [8.0, 16.0], 3: [8.0, 16.0, 32.0]}


def build(nc=2, np=8, ch=(16, 32, 64), seed=0, init=True) -> Polygon:
    torch.manual_seed(seed)
    head = Polygon(nc=nc, np=np, ch=ch)
    head.stride = torch.tensor(STRIDES[len(ch)])
    if init:
        head.bias_init()
    return head


def feats(head: Polygon, batch: int, size: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, size // int(s), size // int(s), generator=gen).to(dtype)
        for c, s in zip(head.ch, head.stride.tolist())
    ]


configs = st.fixed_dictionaries(
    {
        "nc": st.integers(1, 5),
        "np": st.integers(3, 12),
        "ch": st.sampled_from([(8,), (16, 8), (16, 32, 64), (32, 16, 8)]),
    }
)


@given(configs, st.integers(1, 2), st.sampled_from([64, 96]), st.integers(0, 100))
def test_output_shapes_and_dtypes(cfg, batch, size, seed):
    head = build(**cfg, seed=seed)
    x = feats(head, batch, size, seed)
    a = sum((size // int(s)) ** 2 for s in head.stride.tolist())
    train = head.train()(x)
    assert set(train) == {"boxes", "scores", "polygons", "feats"}
    assert train["polygons"].shape == (batch, 2 * cfg["np"], a) and train["polygons"].dtype == torch.float32
    assert train["boxes"].shape == (batch, 4 * head.reg_max, a) and train["scores"].shape == (batch, cfg["nc"], a)
    y, preds = head.eval()(x)
    assert y.shape == (batch, 4 + cfg["nc"] + 2 * cfg["np"], a) and y.dtype == torch.float32
    assert set(preds) == {"boxes", "scores", "polygons", "feats"}


def test_half_head_returns_float32_vertices():
    head = build().eval().to(torch.bfloat16)
    y, preds = head(feats(head, 1, 64, dtype=torch.bfloat16))
    assert preds["polygons"].dtype == torch.bfloat16 and y.dtype == torch.float32


@given(configs, st.integers(0, 100))
def test_eval_vertices_are_decode_polygons_of_raw_offsets_exactly(cfg, seed):
    head = build(**cfg, seed=seed).eval()
    y, preds = head(feats(head, 2, 64, seed))
    anchors, strides = make_anchors(preds["feats"], head.stride)
    expected = decode_polygons(preds["polygons"], anchors, strides)
    torch.testing.assert_close(y[:, 4 + cfg["nc"] :], expected, rtol=0, atol=0)
    # ... which is the documented formula, (2 raw + anchor - 0.5) * stride, per interleaved (x, y) vertex.
    raw, grid = preds["polygons"].double(), anchors.double()
    xy = torch.stack([2 * raw[:, 0::2] + grid[:, 0] - 0.5, 2 * raw[:, 1::2] + grid[:, 1] - 0.5], 2)
    by_formula = (xy * strides.double().view(1, 1, 1, -1)).flatten(1, 2)
    torch.testing.assert_close(expected.double(), by_formula, rtol=1e-6, atol=1e-4)


@given(configs, st.integers(0, 100))
def test_init_polygons_spread_out_near_their_anchor(cfg, seed):
    head = build(**cfg, seed=seed).train()
    with torch.no_grad():
        preds = head(feats(head, 2, 64, seed))
    anchors, strides = make_anchors(preds["feats"], head.stride)
    v = decode_polygons(preds["polygons"], anchors, strides).view(2, cfg["np"], 2, -1) / strides.view(1, 1, 1, -1)
    from_anchor = (v - anchors.T.view(1, 1, 2, -1)).norm(dim=2)  # strides
    # Measured over 480 configs x seeds: max 6.3, 99th percentile 3.9 strides; raw offsets are O(1) behind BatchNorm.
    assert float(from_anchor.max()) <= 12.0, "init vertices must start within a few strides of their anchor"
    assert float(from_anchor.quantile(0.99)) <= 6.0
    spread = (v - v.mean(1, keepdim=True)).norm(dim=2).amax(1)  # per anchor, strides (R2: all 0 if cv4 weights are 0)
    assert bool((spread > 0).all()), "every init polygon must have distinct vertices"
    assert float(spread.median()) >= 0.1


def test_bias_init_runs_detect_init_then_zeroes_only_cv4_bias():
    head = build(init=False)
    weights = [branch[-1].weight.detach().clone() for branch in head.cv4]
    head.cv4[0][-1].bias.data.fill_(3.0)
    head.bias_init(box_bias=1.5, img_size=320, objects_per_image=4.0)
    for level, branch in enumerate(head.cv4):
        assert torch.equal(branch[-1].bias, torch.zeros_like(branch[-1].bias))
        assert torch.equal(branch[-1].weight, weights[level]) and bool(branch[-1].weight.abs().sum() > 0)
        prior = math.log(head.class_prior(level, img_size=320, objects_per_image=4.0))
        torch.testing.assert_close(head.cv3[level][-1].bias, torch.full((head.nc,), prior))
        assert torch.equal(head.cv2[level][-1].bias, torch.full_like(head.cv2[level][-1].bias, 1.5))


def test_bias_init_requires_strides():
    head = Polygon(nc=2, np=4, ch=(8, 16))
    with pytest.raises(ValueError, match="strides are unset"):
        head.bias_init()


@pytest.mark.parametrize("np", [2, 0, 4.0, True])
def test_rejects_bad_vertex_count(np):
    with pytest.raises(ValueError, match="np >= 3"):
        Polygon(nc=1, np=np, ch=(8,))


def _grid(a: int, size: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = torch.stack([torch.arange(a) % size, torch.arange(a) // size], 1).float() + 0.5
    strides = torch.tensor([8.0, 16.0, 32.0, 64.0]).repeat_interleave(math.ceil(a / 4))[:a, None]
    return anchors, strides


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [(torch.float32, DECODE_RAW_BOUND), (torch.bfloat16, DECODE_RAW_BOUND), (torch.float16, 65504.0)],
)
@given(st.integers(0, 2**31 - 1))
def test_decode_finite_up_to_documented_bound(dtype, bound, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = (torch.rand(2, 8, 64, generator=gen) * 2 - 1) * bound
    raw[0, 0, :4] = torch.tensor([bound, -bound, 0.0, 1000.0])  # the bound itself, and R9's fp16 overflow point
    raw = raw.to(dtype)  # the bound itself rounds to the nearest value representable in dtype
    anchors, strides = _grid(64)
    out = decode_polygons(raw, anchors.to(dtype), strides.to(dtype))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    expected = decode_polygons(raw.double(), anchors.double(), strides.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-3)


def test_decode_does_not_clamp_beyond_the_bound():
    anchors, strides = _grid(3)
    raw = torch.tensor([[[1e36, -1e36, 3e38], [0.0, 0.0, 0.0]]])
    out = decode_polygons(raw, anchors, strides)
    assert out[0, 0, :2].tolist() == pytest.approx([2e36 * 8, -2e36 * 16], rel=1e-6)
    assert out[0, 0, 2] == math.inf  # overflows visibly, never clamped


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


@pytest.mark.parametrize("cfg", [dict(nc=1, np=8, ch=(16, 32, 64)), dict(nc=3, np=5, ch=(64, 8))])
def test_state_dict_and_outputs_match_ultralytics_pose_with_xy_keypoints(cfg):
    # Polygon is Pose with kpt_shape (np, 2): same cv2/cv3/cv4/dfl keys and shapes, same raw and decoded outputs.
    ultralytics_head = pytest.importorskip("ultralytics.nn.modules.head")
    ours = _randomise(Polygon(**cfg), seed=1)
    theirs = ultralytics_head.Pose(nc=cfg["nc"], kpt_shape=(cfg["np"], 2), ch=cfg["ch"])
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    theirs.load_state_dict(ours.state_dict())
    for head in (ours, theirs):
        head.stride = torch.tensor(STRIDES[len(cfg["ch"])])
    x = feats(ours, 2, 64, seed=2)
    torch.testing.assert_close(ours.train()(x)["polygons"], theirs.train()(x)["kpts"])
    (y, _), (y_theirs, _) = ours.eval()(x), theirs.eval()(x)
    torch.testing.assert_close(y, y_theirs)
