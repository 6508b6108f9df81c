"""Every check in the catalogue fails on a deliberately broken head, loss or training step (tests/mutants.py), with
the message its author would need, and passes on the reference (or fails there exactly as the reference declares).

A check without a mutant fails here: nobody can add a check without showing that it finds something."""

from __future__ import annotations

import pytest

import headguard.checks  # noqa: F401  (registers the catalogue)
import mutants
from headguard import CATALOGUE, CheckFailure

# Checks of heads; the shape-loss checks have their own meta-test (test_shape_loss_checks.py).
NAMES = sorted(name for name, chk in CATALOGUE.items() if chk.kind == "head")


def test_the_catalogue_is_loaded():
    assert len(NAMES) >= 20, NAMES


def test_no_mutant_for_a_check_that_does_not_exist():
    stale = sorted(set(mutants.MUTANTS) - set(NAMES))
    assert not stale, f"tests/mutants.py maps checks that are not in the catalogue: {stale}"


def _gap(name: str):
    reason = mutants.CHECK_GAPS.get(name)
    return [pytest.mark.xfail(strict=True, reason=f"check gap: {reason}")] if reason else []


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=_gap(n)) for n in NAMES])
def test_check_fails_on_its_mutant(name):
    assert name in mutants.MUTANTS, (
        f"{name} has no mutant: add a deliberately broken head/loss/step to tests/mutants.py and map it in MUTANTS, "
        "with the message fragment in MESSAGES"
    )
    message = mutants.failure_message(mutants.MUTANTS[name], name)
    assert mutants.MESSAGES[name] in message, message


REFERENCES = {"Polygon": "REFERENCE", "Detect": "REFERENCE_DETECT"}
DETECT_CAPABILITIES = {"dfl"}


def _reference_cases():
    """(reference, check) pairs: every check on Polygon, and those that need no polygons on Detect too."""
    for head in REFERENCES:
        for name in NAMES:
            if head == "Detect" and not CATALOGUE[name].requires <= DETECT_CAPABILITIES:
                continue
            reason = mutants.REFERENCE_GAPS.get(name)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(head, name, id=f"{head}-{name}", marks=marks)


@pytest.mark.parametrize(("head", "name"), list(_reference_cases()))
def test_check_passes_on_the_reference(head, name):
    spec = getattr(mutants, REFERENCES[head])
    outcome = mutants.check_outcome(spec, name)
    declared = mutants.subject(spec).expected_failures
    if name in declared:
        # Declared by the reference itself: it must really fail (an undeclared pass would hide a changed reference).
        assert isinstance(outcome, CheckFailure), f"{name} is declared to fail on the reference, got {outcome!r}"
        pytest.xfail(declared[name].reason)
    mutants.assert_passes(spec, name)
