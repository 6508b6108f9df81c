"""R4 — per-image polygon losses accumulated and never averaged (and the vector then multiplied by B): the polygon
term grew with the batch size, B^2 in the returned vector."""

from __future__ import annotations

import functools

import pytest
import torch

import mutants
from headguard.testing import detached_preds, features, fit_boxes_to_first_object, ordinary_targets, train_preds

CHECK = "check_loss_batch_replication"


def _replicated(k: int):
    """One image (predictions fitted to its first object, so max(1, .) never clamps) and its objects, k times."""
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    preds = detached_preds(train_preds(subject, head, features(subject, batch=1, image_size=(64, 64))))
    batch = ordinary_targets(subject, 1, per_image=1)
    preds = fit_boxes_to_first_object(preds, batch, subject.strides)
    many = {key: [f.repeat(k, 1, 1, 1) for f in v] if key == "feats" else v.repeat(k, 1, 1) for key, v in preds.items()}
    rep = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in batch.items() if key != "batch_idx"}
    rep["batch_idx"] = torch.arange(k, dtype=torch.float32)
    return head, many, rep


@functools.cache
def _polygon(spec_name: str, k: int) -> tuple[float, float]:
    """(polygon item, polygon entry of the returned vector) for one image replicated k times."""
    spec = getattr(mutants, spec_name)
    head, preds, batch = _replicated(k)
    vector, items = mutants.build_loss(spec, head)(preds, batch)
    return float(items["polygon_loss"]), float(vector[1])


@pytest.mark.parametrize("k", [2, 4])
def test_symptom_polygon_term_grows_with_batch(k):
    one_item, one_vector = _polygon("R4_SPEC", 1)
    item, vector = _polygon("R4_SPEC", k)
    assert item == pytest.approx(k * one_item, rel=1e-4)
    assert vector == pytest.approx(k * k * one_vector, rel=1e-4)  # B^2 in the vector the optimizer sees


@pytest.mark.parametrize("k", [2, 4])
def test_reference_polygon_item_is_unchanged_by_replication(k):
    assert _polygon("REFERENCE", k)[0] == pytest.approx(_polygon("REFERENCE", 1)[0], rel=1e-4)


def test_check_fails_on_mutant():
    assert "replicated" in mutants.failure_message(mutants.R4_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)
