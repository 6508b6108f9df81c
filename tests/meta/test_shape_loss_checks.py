"""Every shape-loss check fails on a deliberately broken MGIoU (tests/shape_mutants.py) with the message its author
needs, and passes on the reference `losses.mgiou`.

A shape-loss check without a case in `shape_mutants.CASES` fails here: no check joins the catalogue without showing
that it finds something.

The checks run under the deterministic `headguard-ci` profile.
"""

from __future__ import annotations

import pytest

import losses
import shape_mutants
from headguard import CATALOGUE, CheckFailure
from headguard.registry import CheckContext
from headguard.shapes import CLAIMS
from headguard.targets import subject_from

PROFILE = "headguard-ci"  # the harness leaves Hypothesis' explain phase out of it (it costs seconds per failure)
SHAPE_CHECKS = sorted(name for name, chk in CATALOGUE.items() if chk.kind == "shape_loss")
REFERENCE = subject_from(losses.mgiou, name="losses.mgiou:mgiou")


def outcome(subject, name: str) -> BaseException | None:
    try:
        CATALOGUE[name](subject, CheckContext(profile=PROFILE, seed=0))
    except Exception as err:  # noqa: BLE001  (CheckFailure is the finding; anything else is reported by the test)
        return err
    return None


def test_every_shape_loss_check_has_a_mutant():
    assert len(SHAPE_CHECKS) >= 19, SHAPE_CHECKS
    assert sorted(shape_mutants.CASES) == SHAPE_CHECKS


def test_the_reference_claims_every_axiom():
    assert REFERENCE.claims == set(CLAIMS)
    assert all(CATALOGUE[name].applies_to(REFERENCE) for name in SHAPE_CHECKS)


CASES = [pytest.param(name, mutant, fragment, id=f"{name}-{getattr(mutant, '__name__', name)}")
         for name, (mutant, fragment) in shape_mutants.CASES.items()]
CASES += [pytest.param(name, mutant, fragment, id=f"{name}-{mutant.__name__}")
          for name, mutant, fragment in shape_mutants.EXTRA_CASES]


@pytest.mark.parametrize(("name", "mutant", "fragment"), CASES)
def test_check_fails_on_its_mutant(name, mutant, fragment):
    subject = subject_from(mutant)
    assert CATALOGUE[name].applies_to(subject)
    found = outcome(subject, name)
    assert isinstance(found, CheckFailure), f"{name} should fail on {subject.name} with a CheckFailure, got {found!r}"
    assert fragment in found.message, found.message
    assert found.example and "Falsifying example" in found.example, found.example


@pytest.mark.parametrize("name", SHAPE_CHECKS)
def test_check_passes_on_mgiou(name):
    assert outcome(REFERENCE, name) is None
