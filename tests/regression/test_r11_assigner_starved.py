"""R11 — from a bad initialisation every anchor's alignment metric can be <= 0: the task-aligned assigner assigns no
positive, and the loss drops "deceptively" while every object is missed (reported upstream). The reference keeps
Ultralytics' behaviour by default and declares the failure; `AssignerConfig(ensure_coverage=True)` is the remedy."""

from __future__ import annotations

import math

import torch

import losses
import mutants
from headguard import CATALOGUE
from headguard.testing import detached_preds, features, train_preds
from headguard.runner import run_check

CHECK = "check_assigner_coverage"


def _batch(np: int) -> dict[str, torch.Tensor]:
    """One object in the lower right of a 64 px image (anchors of every level lie inside it)."""
    cx, cy, side = 0.68, 0.68, 0.4
    angle = torch.arange(np) * (2 * math.pi / np)
    return {
        "batch_idx": torch.zeros(1),
        "cls": torch.zeros(1, 1),
        "bboxes": torch.tensor([[cx, cy, side, side]]),
        "polygons": torch.stack((cx + side / 2 * angle.cos(), cy + side / 2 * angle.sin()), -1)[None],
    }


def _wild_and_sane(head):
    """The head's initial predictions, and wild ones: class logits -20, every box collapsed onto its anchor."""
    subject = mutants.subject(mutants.REFERENCE)
    sane = detached_preds(train_preds(subject, head, features(subject, batch=1, image_size=(64, 64))))
    wild = detached_preds(sane)
    wild["scores"] = torch.full_like(sane["scores"], -20.0)
    reg_max = head.reg_max
    logits = torch.full((1, 4, reg_max, sane["boxes"].shape[-1]), -50.0)
    logits[:, :, 0] = 50.0  # all mass on bin 0: distance 0 on every side
    wild["boxes"] = logits.view_as(sane["boxes"])
    return wild, sane


def _run(assigner: losses.AssignerConfig):
    head = mutants.subject(mutants.REFERENCE).build_head()
    wild, sane = _wild_and_sane(head)
    loss = losses.PolygonLoss.for_head(head, assigner=assigner)
    batch = _batch(head.np)
    terms = loss.terms(wild, batch)
    return terms, float(terms.vector.sum()), float(loss.terms(sane, batch).vector.sum())


def test_symptom_no_positive_and_a_deceptively_low_loss():
    terms, wild_total, sane_total = _run(losses.AssignerConfig())
    # Every metric is 0, so topk's tie-break decides: any positive it leaves carries weight 0.
    assert float(terms.weight.sum()) == 0.0, f"the object should get no weighted positive, got {terms.weight}"
    assert [float(v) for v in terms.vector[[0, 1, 3]]] == [0.0, 0.0, 0.0]  # box, polygon, dfl: nothing to learn from
    assert wild_total < sane_total, (wild_total, sane_total)  # the wild head "looks" better than a sane one


def test_remedy_gives_the_object_a_weighted_positive():
    terms, _, _ = _run(losses.AssignerConfig(ensure_coverage=True))
    det = terms.detection
    assert int(det.fg_mask.sum()) >= 1
    assert float(terms.weight.max()) > 0 and float(terms.vector[0]) > 0


def test_check_fails_on_the_ultralytics_compatible_assigner():
    assert "the assigner starved it" in mutants.failure_message(mutants.R11_SPEC, CHECK)


def test_reference_declares_it_and_the_harness_reports_an_xfail():
    assert CHECK in mutants.subject(mutants.REFERENCE).expected_failures
    result = run_check(mutants.subject(mutants.REFERENCE), CATALOGUE[CHECK], profile="ci", seed=0)
    assert result.status == "xfailed", (result.status, result.message)


def test_check_passes_with_the_remedy():
    mutants.assert_passes(mutants.REFERENCE_COVERAGE, CHECK)
