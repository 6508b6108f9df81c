"""R1 — a `bias_init` override for cv4 that never called the parent's: cv3 kept PyTorch's default bias, so every
class logit started near sigmoid 0.5 instead of the prior, and the initial cls loss was hundreds of times too big."""

from __future__ import annotations

import pytest
import torch

import heads
import losses
import mutants

IMAGE = 640  # the incident's setting: 640 px, batch 2, nc = 1


def _initial_cls_item(head_cls) -> tuple[float, float]:
    """(initial cls loss item, bound derived from the prior) for a fresh head on seeded features and two objects."""
    head = head_cls(nc=1, ch=mutants.CHANNELS)
    head.stride = torch.tensor(mutants.STRIDES)
    head.bias_init()
    gen = torch.Generator().manual_seed(0)
    sizes = [IMAGE // int(s) for s in mutants.STRIDES]
    feats = [torch.randn(2, c, n, n, generator=gen) for c, n in zip(head.ch, sizes)]
    batch = {
        "batch_idx": torch.tensor([0.0, 0.0, 1.0, 1.0]),
        "cls": torch.zeros(4, 1),
        "bboxes": torch.tensor(
            [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.1, 0.1]]
        ),
    }
    criterion = losses.DetectionLoss.for_head(head)
    with torch.no_grad():
        _, items = criterion(head(feats), batch)
    # The negatives alone contribute about sum over levels of anchors * nc * prior per image (BCE of a logit log(p)
    # against 0 is log(1 + p) ~ p), divided by max(1, sum of target scores) >= 1, times the cls gain.
    negatives = sum((IMAGE / s) ** 2 * head.nc * head.class_prior(level) for level, s in enumerate(mutants.STRIDES))
    bound = criterion.gains.cls * 2 * negatives
    return float(items["cls_loss"]), bound


def test_symptom_initial_cls_loss_is_hundreds():
    item, bound = _initial_cls_item(mutants.PolygonDroppedPriors)
    assert bound == pytest.approx(15.0)  # 0.5 * 2 images * 3 levels * 5 objects per image
    assert item > 10 * bound, f"mutant's initial cls item {item:.4g}; expected hundreds (the incident: 434)"


def test_reference_initial_cls_loss_is_below_the_prior_bound():
    item, bound = _initial_cls_item(heads.Polygon)
    assert item < bound, f"reference initial cls item {item:.4g} above the prior-derived bound {bound:.4g}"


def test_symptom_class_logits_start_at_pytorch_default():
    head = mutants.subject(mutants.R1_SPEC).build_head()
    biases = torch.cat([branch[-1].bias.detach() for branch in head.cv3])
    prior = heads.Polygon.class_prior(head, 0)
    # PyTorch's default bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): sigmoid ~ 0.5, hundreds of times the prior.
    assert bool((biases.sigmoid() > 100 * prior).all())


@pytest.mark.parametrize(
    ("check_name", "phrase"),
    [
        ("check_final_convs_initialised", "was never set by bias_init()"),
        ("check_class_prior", "implies a class prior"),
        ("check_initial_cls_loss_bounded", "initial cls_loss item is"),
    ],
)
def test_check_fails_on_mutant(check_name, phrase):
    assert phrase in mutants.failure_message(mutants.R1_SPEC, check_name)


@pytest.mark.parametrize(
    "check_name", ["check_final_convs_initialised", "check_class_prior", "check_initial_cls_loss_bounded"]
)
def test_check_passes_on_reference(check_name):
    mutants.assert_passes(mutants.REFERENCE, check_name)
