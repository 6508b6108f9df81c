"""R5 — the assigner's per-image index into the image's own padded objects was used as a row of the batch-wide flat
list: anchors of image 1 were trained towards the polygons of image 0's objects."""

from __future__ import annotations

import torch

import mutants
from headguard.testing import detached_preds, features, ordinary_targets, train_preds

CHECK = "check_loss_batch_decomposition"


def _matched_images(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(image of each positive anchor, image of the object whose polygon it is trained towards)."""
    subject = mutants.subject(mutants.REFERENCE)
    head = subject.build_head()
    preds = detached_preds(train_preds(subject, head, features(subject, batch=2, image_size=(64, 64))))
    batch = ordinary_targets(subject, 2, per_image=2)
    terms = mutants.build_loss(spec, head).terms(preds, batch)
    positive_image = terms.detection.fg_mask.nonzero(as_tuple=True)[0]
    return positive_image, batch["batch_idx"].long()[terms.rows]


def test_symptom_image_1_learns_image_0_objects():
    positive_image, object_image = _matched_images(mutants.R5_SPEC)
    assert bool((positive_image == 1).any())
    assert bool((object_image[positive_image == 1] == 0).all())


def test_reference_matches_each_anchor_to_its_own_image():
    positive_image, object_image = _matched_images(mutants.REFERENCE)
    assert bool((positive_image == 1).any())
    assert torch.equal(positive_image, object_image)


def test_check_fails_on_mutant():
    assert "swapping the two images" in mutants.failure_message(mutants.R5_SPEC, CHECK)


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)


def test_replication_cannot_see_it():
    """Copies of one image have the same objects in the same slots, so R4's property passes on this mutant."""
    mutants.assert_passes(mutants.R5_SPEC, "check_loss_batch_replication")
