"""build_subject: what a HeadSpec turns into (strides, capabilities, the default loss)."""

from __future__ import annotations

import math

import pytest

import heads
import losses
from headguard import HeadSpec, build_subject


def test_a_two_level_head_gets_the_specs_strides_before_bias_init():
    subject = build_subject(HeadSpec(heads.Detect, head_kwargs={"ch": (16, 32)}, strides=(4, 8)), "two-level")
    head = subject.build_head()
    assert subject.strides == (4.0, 8.0) and head.stride.tolist() == [4.0, 8.0]
    assert subject.feature_shapes((64, 64), batch=1) == [(1, 16, 16, 16), (1, 32, 8, 8)]
    # bias_init() ran with the stride of 4: the class prior of level 0 is log(5 / nc / (640 / 4)^2).
    assert head.cv3[0][-1].bias[0].item() == pytest.approx(math.log(5 / 2 / (640 / 4) ** 2), rel=1e-6)


def test_strides_that_do_not_match_the_levels_are_refused():
    with pytest.raises(ValueError, match=r"2 strides \(8.0, 16.0\) for 3 levels"):
        build_subject(HeadSpec(heads.Detect, strides=(8, 16)), "mismatch")


@pytest.mark.parametrize(("cls", "loss_cls", "caps"), [
    (heads.Detect, losses.DetectionLoss, {"dfl"}),
    (heads.Polygon, losses.PolygonLoss, {"dfl", "polygons"}),
])
def test_capabilities_and_default_loss_follow_what_the_head_produces(cls, loss_cls, caps):
    subject = build_subject(HeadSpec(cls), cls.__name__)
    assert subject.capabilities == caps
    assert type(subject.build_loss(subject.build_head())) is loss_cls
