"""Shape losses as subjects (headguard.shapes): the spec's validation, which objects become subjects, the setup
probe's errors, the exact IoU oracle, and `headguard check` on a shape loss (exit 0, 1 naming the axiom, 2)."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

import losses
from headguard import ShapeLossSpec
from headguard.checks.shape_loss import representable
from headguard.cli import main
from headguard.runner import select_checks
from headguard.shapes import CLAIMS, DEFAULT_CLAIMS, ShapeLossError, ShapeLossSubject, shape_subject_from
from headguard.strategies import PolygonPair
from headguard.subject import ExpectedFailure
from headguard.targets import TargetError, subject_from
from tests._polygon_iou import intersection, polygon_iou, signed_area


def l1(pred, target, pred_mask=None, target_mask=None):
    """A shape loss that is no IoU: the mean vertex distance."""
    return (pred - target).abs().mean(dim=(1, 2))


def pair_only(pred, target):
    return (pred - target).abs().mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------------------- the spec
def test_default_claims_are_the_mgiou_family_without_approximates_iou():
    assert DEFAULT_CLAIMS == set(CLAIMS) - {"approximates_iou"}
    assert ShapeLossSpec(l1).claims == DEFAULT_CLAIMS


def test_spec_stores_claims_as_a_frozenset_and_reasons_as_expected_failures():
    spec = ShapeLossSpec(l1, claims=["symmetric"], expected_failures={"check_shape_loss_bounded": "grows"})
    assert spec.claims == frozenset({"symmetric"})
    assert spec.expected_failures == {"check_shape_loss_bounded": ExpectedFailure("grows")}


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"fn": 3}, TypeError, "Expected a function (or callable instance) for fn, got fn=3"),
    ({"fn": torch.nn.L1Loss}, TypeError, "(a class: pass an instance or a function)"),
    ({"fn": l1, "claims": "symmetric"}, TypeError, "Expected a collection of claim names for claims, "
                                                   "got claims='symmetric'"),
    ({"fn": l1, "claims": {"symetric"}}, ValueError, "got unknown claim(s) ['symetric']"),
    ({"fn": l1, "expected_failures": {"check_x": ""}}, TypeError, "for expected_failures, got "
                                                                 "expected_failures={'check_x': ''}"),
    ({"fn": l1, "name": ""}, TypeError, "Expected a non-empty string or None for name, got name=''"),
])
def test_spec_rejects_misuse_naming_the_field_and_value(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ShapeLossSpec(**kwargs)


# ---------------------------------------------------------------------------------------------- which subjects
def test_a_plain_function_becomes_a_subject_with_the_default_claims():
    subject = shape_subject_from(l1, name="mine:l1")
    assert isinstance(subject, ShapeLossSubject) and subject.kind == "shape_loss"
    assert subject.name == "mine:l1" and subject.capabilities == DEFAULT_CLAIMS
    names = [c.name for c in select_checks(subject)]
    assert names and all(n.startswith("check_shape_loss_") for n in names)
    assert "check_shape_loss_ranks_like_iou" not in names


def test_mgiou_claims_approximates_iou_too():
    subject = subject_from(losses.mgiou)
    assert subject.name == "losses.mgiou:mgiou" and subject.claims == set(CLAIMS)


class _Weighted:
    def loss(self, pred, target):
        return 0.5 * pair_only(pred, target)


@pytest.mark.parametrize("fn", [pair_only, functools.partial(l1), _Weighted().loss],
                         ids=["two-arguments", "partial", "bound-method"])
def test_functions_taking_a_pair_are_shape_losses(fn):
    assert shape_subject_from(fn, name="x") is not None


@pytest.mark.parametrize("obj", [torch.nn.Linear, torch.nn.Linear(2, 2), lambda x: x, "losses:mgiou", None],
                         ids=["module-class", "module-instance", "one-argument", "string", "none"])
def test_anything_else_is_not_a_shape_loss(obj):
    assert shape_subject_from(obj, name="x") is None


def test_a_spec_name_wins_and_an_unnamed_spec_is_named_after_its_function():
    assert subject_from(ShapeLossSpec(l1, name="my l1")).name == "my l1"
    assert subject_from(ShapeLossSpec(l1)).name == f"{__name__}:l1"
    assert subject_from(ShapeLossSpec(l1), name="specs:L1").name == "specs:L1"


def test_an_existing_subject_is_returned_as_it_is():
    subject = shape_subject_from(l1, name="x")
    assert subject_from(subject) is subject


def test_masks_are_passed_only_when_given():
    subject = shape_subject_from(pair_only, name="x")
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    assert subject.loss(square, square).shape == (1,)
    with pytest.raises(TypeError):
        subject.loss(square, square, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize(("fn", "found"), [
    (lambda p, t: (p - t).abs().sum(), "returned a torch.float32 tensor of shape ()"),
    (lambda p, t: (p - t).abs().sum(-1), "returned a torch.float32 tensor of shape (2, 4)"),
    (lambda p, t: [0.0, 0.0], "returned a list"),
    (lambda p, t: torch.zeros(2, dtype=torch.long), "returned a torch.int64 tensor of shape (2,)"),
    (lambda p, t: 1 / 0, "raised ZeroDivisionError: division by zero"),
], ids=["scalar", "per-vertex", "list", "integer", "raises"])
def test_the_setup_probe_names_what_the_loss_returned(fn, found):
    with pytest.raises(ShapeLossError, match=re.escape(found)) as info:
        shape_subject_from(fn, name="mine:loss")
    assert "expected a floating-point tensor of shape (N,) = (2,), one loss per pair" in str(info.value)
    with pytest.raises(TargetError, match=re.escape(found)):
        subject_from(ShapeLossSpec(fn))


# ------------------------------------------------------------------------------------------------------ the oracle
def test_exact_iou_oracle_on_known_cases():
    square = np.array([[0.0, 0], [1, 0], [1, 1], [0, 1]])
    assert polygon_iou(square, square[::-1]) == pytest.approx(1.0)
    assert polygon_iou(square, square + [0.5, 0]) == pytest.approx(1 / 3)
    assert polygon_iou(square, square + [2, 0]) == 0.0
    diamond = np.array([[0.5, -0.5], [1.5, 0.5], [0.5, 1.5], [-0.5, 0.5]])  # area 2, clipped to the square: 1
    assert abs(signed_area(intersection(diamond, square))) == pytest.approx(1.0)
    assert polygon_iou(diamond, square) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- the CLI
def run(capsys, *argv):
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_mgiou_passes_selected_checks_and_exits_0(capsys):
    code, out, _ = run(capsys, "losses.mgiou:mgiou", "--select", "check_shape_loss_symmetric",
                       "check_shape_loss_ranks_like_iou")
    assert code == 0, out
    assert "  passed   check_shape_loss_symmetric" in out and "  passed   check_shape_loss_ranks_like_iou" in out


def test_a_broken_axiom_exits_1_naming_it_with_a_shrunk_pair(capsys):
    code, out, _ = run(capsys, "shape_mutants:mgiou_target_axes_only", "--select", "check_shape_loss_symmetric",
                       "--profile", "ci")
    assert code == 1
    assert "FAILED shape_mutants:mgiou_target_axes_only::check_shape_loss_symmetric" in out
    assert "message:  symmetry: loss(pred, target) = " in out and "pred = [[" in out and "target = [[" in out
    assert "Falsifying example" in out and "PolygonPair(pred=[[" in out


def test_a_loss_of_the_wrong_shape_is_a_one_line_usage_error(capsys):
    code, _, err = run(capsys, "tests.harness.test_shapes:summed")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and "returned a torch.float32 tensor of shape ()" in lines[0], err


def summed(pred, target, pred_mask=None, target_mask=None):
    """Reduced over the batch inside the loss: not a shape loss of the contract."""
    return (pred - target).abs().sum()


def test_pairs_closer_than_rounding_are_not_transformed():
    # Found by the fuzz profile: two points one ulp apart (loss 1, distinct points) merge when scaled about their
    # centre (loss 0), which says nothing about the loss; the joint-transformation checks skip such pairs.
    point = torch.tensor([[1.0, 0.226219]] * 3, dtype=torch.float64)
    nudged = point.clone()
    nudged[:, 0] = torch.nextafter(nudged[:, 0], torch.tensor(2.0, dtype=torch.float64))
    centre = (point[0] + nudged[0]) / 2
    assert torch.equal(centre + 0.1 * (point - centre), centre + 0.1 * (nudged - centre))
    assert not representable(PolygonPair(nudged, point))
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert representable(PolygonPair(square, square[[0, 0, 1, 2]]))
