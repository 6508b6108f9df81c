"""heads.Detect equals Ultralytics 8.4.190's Detect: same state-dict keys and shapes, same outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heads import Detect

from ._ultralytics import UltralyticsDetect, randomise_

CONFIGS = [
    dict(nc=1, reg_max=16, ch=(16, 32, 64)),
    dict(nc=80, reg_max=16, ch=(32, 64, 128)),
    dict(nc=3, reg_max=8, ch=(8, 16)),
    dict(nc=120, reg_max=4, ch=(24,)),
]
STRIDES = {3: [8.0, 16.0, 32.0], 2: [8.0, 16.0], 1: [16.0]}


def _pair(cfg: dict, seed: int) -> tuple[Detect, UltralyticsDetect]:
    ours = randomise_(Detect(**cfg), seed)
    theirs = UltralyticsDetect(**cfg)
    theirs.load_state_dict(ours.state_dict())
    for head in (ours, theirs):
        head.stride = torch.tensor(STRIDES[len(cfg["ch"])])
    return ours, theirs


def _feats(cfg: dict, batch: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    strides = STRIDES[len(cfg["ch"])]
    return [torch.randn(batch, c, size // int(s), size // int(s), generator=gen) for c, s in zip(cfg["ch"], strides)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"nc{c['nc']}-r{c['reg_max']}-l{len(c['ch'])}")
def test_state_dict_keys_and_shapes_match(cfg):
    ours, theirs = Detect(**cfg), UltralyticsDetect(**cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"nc{c['nc']}-r{c['reg_max']}-l{len(c['ch'])}")
def test_state_dict_round_trip(cfg):
    ours, theirs = _pair(cfg, seed=1)
    back = Detect(**cfg)
    back.load_state_dict(theirs.state_dict())
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"state_dict[{k!r}] changed on the round trip")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"nc{c['nc']}-r{c['reg_max']}-l{len(c['ch'])}")
@settings(max_examples=5)  # per config: 4 configs x 5 examples keeps this test near 2 s of CPU
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), size=st.sampled_from([64, 96]))
def test_training_and_eval_outputs_match(cfg, seed, batch, size):
    ours, theirs = _pair(cfg, seed)
    feats = _feats(cfg, batch, size, seed + 1)
    a, b = ours.train()(feats), theirs.train()(feats)
    for key in ("boxes", "scores"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    (ya, pa), (yb, pb) = ours(feats), theirs(feats)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pa["scores"], pb["scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"nc{c['nc']}-r{c['reg_max']}-l{len(c['ch'])}")
def test_bias_init_matches(cfg):
    ours, theirs = _pair(cfg, seed=2)
    ours.bias_init(), theirs.bias_init()
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{k} differs after bias_init()")
