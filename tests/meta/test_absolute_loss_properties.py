"""The absolute loss properties (headguard.checks.loss, issue 10 item 3): their constructions do what the checks
claim, read off the reference loss's internals (which the checks themselves never see), and the checks tell the
behaviours apart that the relative properties cannot."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import heads
import losses
import mutants
from headguard import CATALOGUE, CheckFailure, HeadSpec, build_subject
from headguard.checks import loss as checks
from headguard.registry import CheckContext
from heads._decode import dfl_expectation

CTX = CheckContext(profile="ci", seed=0)
POLYGON = mutants.subject(mutants.REFERENCE)
SETTING = checks._absolute_setup(POLYGON, CTX)


def _scenes(**kwargs):
    defaults = dict(batch_size=2, min_objects=1, max_objects=3, max_cells=SETTING.max_cells, moved=True)
    return checks._scenes(POLYGON, SETTING.cell, **{**defaults, **kwargs})


def _inputs(scene, fitted="inside", **kwargs):
    feats, anchors = checks._scene_inputs(POLYGON, SETTING, scene)
    mask = anchors.owner >= 0 if fitted == "inside" else anchors.representative
    preds = checks._constructed_preds(SETTING.outputs, scene, anchors, feats, mask, anchors.representative, **kwargs)
    return preds, anchors


def _positives(terms):
    """(object row, level-free anchor index, weight) of every positive of the reference loss."""
    det = terms.detection
    image, anchor = det.fg_mask.nonzero(as_tuple=True)
    return det.gt_rows[image, det.target_gt_idx[image, anchor]], anchor, det.target_scores[image, anchor].sum(-1)


@settings(max_examples=15, deadline=None, database=None)
@given(_scenes(), st.floats(0.0, 0.8))
def test_the_fit_decodes_exactly_and_the_spread_keeps_the_expectation(scene, mix):
    preds, anchors = _inputs(scene)
    spread, _ = _inputs(scene, spread=mix)
    inside = anchors.owner >= 0
    fit = dfl_expectation(preds["boxes"].double())
    assert torch.allclose(dfl_expectation(spread["boxes"].double()), fit, atol=1e-9)
    # Every fitted distance is halfway between two bins (box edges on the 32 px grid, anchors at cell centres).
    frac = fit.permute(0, 2, 1)[inside] % 1
    assert torch.allclose(frac, torch.full_like(frac, 0.5), atol=1e-9)


@settings(max_examples=15, deadline=None, database=None)
@given(_scenes(moved=False))
def test_at_the_fit_box_and_polygon_are_zero_dfl_its_floor_and_every_object_has_positives_on_every_level(scene):
    preds, anchors = _inputs(scene)
    terms = SETTING.loss.terms(preds, scene.batch)
    box, polygon, _, dfl = terms.vector.tolist()
    assert abs(box) < checks.ZERO_ATOL / 10 and abs(polygon) < checks.ZERO_ATOL / 10
    assert dfl == pytest.approx(SETTING.loss.gains.dfl * math.log(2), rel=1e-6)
    rows, anchor, weight = _positives(terms)
    for row in range(scene.boxes.shape[0]):
        levels = anchors.level[anchor[(rows == row) & (weight > 0.5)]]
        assert set(levels.tolist()) == {0, 1, 2}, (row, levels)


@settings(max_examples=15, deadline=None, database=None)
@given(_scenes(batch_size=1, min_objects=2))
def test_each_object_weighs_one_per_level_so_the_image_term_is_the_mean(scene):
    """The decomposition's premise: S_i = number of levels for every object, so T = mean of the T_i."""
    preds, _ = _inputs(scene, fitted="representatives", moved=True)
    terms = SETTING.loss.terms(preds, scene.batch)
    rows, _, weight = _positives(terms)
    per_object = [float(weight[rows == row].sum()) for row in range(scene.boxes.shape[0])]
    assert per_object == pytest.approx([3.0] * len(per_object), abs=1e-5)
    assert float(terms.vector[1]) > 0 or bool((scene.moves[:, :3] == torch.tensor([1.0, 0, 0])).all())


@pytest.mark.parametrize("name", ["check_loss_minimum_at_exact_fit", "check_loss_per_object_decomposition"])
def test_mgiou_reference_passes_too(name):
    CATALOGUE[name](mutants.subject(mutants.REFERENCE_MGIOU), CTX)


def test_a_box_term_off_by_a_constant_fails_the_exact_fit_on_every_level():
    message = mutants.failure_message(mutants.BOX_OFFSET_SPEC, "check_loss_minimum_at_exact_fit")
    assert "box_loss = 0.15" in message and "stride 32: box_loss 0.15" in message


def test_the_wrong_stride_is_named_by_its_level():
    message = mutants.failure_message(mutants.WRONG_STRIDE_SPEC, "check_loss_minimum_at_exact_fit")
    per_level = {int(s): float(v) for s, v in re.findall(r"stride (\d+): polygon_loss ([-\d.e+]+)", message)}
    assert per_level[8] < 1e-6 and per_level[16] < 1e-6 and per_level[32] > 1, message


def test_a_declared_family_is_compared_with_its_reference():
    """A subject declaring "polygon-mgiou" while its loss is the l2 reference fails (the HeadSpec field to come is
    read as `subject.loss_family`)."""
    subject = build_subject(HeadSpec(heads.Polygon, loss=losses.PolygonLoss.for_head), "l2 declared as mgiou")
    subject.loss_family = "polygon-mgiou"
    with pytest.raises(CheckFailure, match=r"declares loss_family='polygon-mgiou'.*polygon_loss"):
        CATALOGUE["check_loss_matches_reference_family"](subject, CTX)


def test_an_undeclared_foreign_loss_skips_the_family_check():
    from headguard.registry import CheckSkipped

    with pytest.raises(CheckSkipped, match="declares no loss family"):
        CATALOGUE["check_loss_matches_reference_family"](mutants.subject(mutants.WRONG_STRIDE_SPEC), CTX)


def test_nan_cleaned_at_background_anchors_only_is_named_as_such():
    message = mutants.failure_message(mutants.BACKGROUND_CLEANING_SPEC, "check_loss_rejects_nonfinite")
    assert "at an anchor inside no object" in message and "at background anchors it replaced it" in message


def _verdict(key, positive, background, *, original=1.0):
    outcomes = {"a positive anchor": positive, "an anchor inside no object": background}
    return checks._nonfinite_verdict(key, math.nan, "stride 8", outcomes.__getitem__, lambda: torch.tensor([original]))


RAISED = ("raised", ValueError("preds['boxes'] has non-finite values"))


@pytest.mark.parametrize(("key", "positive", "background", "expected"), [
    ("boxes", RAISED, RAISED, None),
    ("boxes", RAISED, ("finite", torch.tensor([1.0])), None),  # never reads a background box: right (Ultralytics)
    ("polygons", RAISED, ("finite", torch.tensor([1.0])), None),
    ("scores", RAISED, ("finite", torch.tensor([1.0])), "the loss ignores preds['scores'] at anchors inside no"),
    ("scores", RAISED, ("finite", torch.tensor([2.0])), "at background anchors it replaced it by a finite value"),
    ("boxes", ("finite", torch.tensor([2.0])), RAISED, "at a positive anchor (stride 8): it replaced it"),
    ("boxes", ("non-finite", torch.tensor([math.nan])), RAISED, "returned a non-finite value"),
    ("scores", RAISED, ("non-finite", torch.tensor([math.nan])), "inside no object (stride 8) without raising"),
    ("boxes", ("raised", ValueError("")), RAISED, "with no message"),
])
def test_the_contrast_names_each_behaviour(key, positive, background, expected):
    verdict = _verdict(key, positive, background)
    if expected is None:
        assert verdict is None
    else:
        assert expected in verdict


def test_ultralytics_v8_detection_loss_meets_the_absolute_properties_and_its_family():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.modules.head import Detect

    from headguard.adapters.ultralytics import detection_loss

    subject = build_subject(HeadSpec(head=Detect, loss=detection_loss), "ultralytics:Detect")
    for name in ("check_loss_minimum_at_exact_fit", "check_loss_per_object_decomposition",
                 "check_loss_matches_reference_family"):
        CATALOGUE[name](subject, CTX)
