"""What drawing buys (issue 10): every check declares its inputs in its registration, or says why drawing cannot
find more, and a bug that only drawn inputs reach is found, where one seeded standard-normal input (what 16 checks
ran on before) finds nothing."""

from __future__ import annotations

import inspect

import pytest

from headguard import build_subject
from headguard.registry import CATALOGUE, CheckContext, load_catalogue
from headguard.runner import run_check
from headguard.testing import features

import mutants

load_catalogue()
BUILT_IN = sorted(CATALOGUE)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_check_draws_or_says_why_not(name):
    chk = CATALOGUE[name]
    assert chk.inputs or "Drawing cannot find more here" in inspect.getdoc(chk.body), (
        f"{name} declares no inputs, and its docstring does not say why drawing cannot find more")


def test_a_bug_only_drawn_layouts_reach_is_found():
    subject = build_subject(mutants.VIEW_SPEC, name="mutants:VIEW_SPEC")
    contract = CATALOGUE["check_output_contract"]
    # One seeded standard-normal input, the old way: the property holds there.
    contract.body(subject, CheckContext(profile="ci"), feats=features(subject, batch=2))
    result = run_check(subject, contract, profile="ci")
    assert result.status == "failed"
    assert "view size is not compatible" in result.message
    assert "layout='channels_last'" in result.example or "layout='non_contiguous'" in result.example


def test_the_reference_passes_the_same_draws():
    result = run_check(build_subject(mutants.REFERENCE, name="heads:Polygon"), CATALOGUE["check_output_contract"],
                       profile="ci")
    assert result.status == "passed", result.message
