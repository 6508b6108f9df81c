"""R0 — the epoch-4 crash: a skipped non-finite step leaves BatchNorm's running statistics poisoned, so training
goes on with a falling loss while every eval output is NaN. Clipping at 10, a zero final bias and a loss that masks
NaN logits do not prevent it; restoring the buffers of the skipped step does."""

from __future__ import annotations

import math

import torch

import mutants
from headguard import training

CHECK = "check_skipped_step_leaves_model_finite"
IMAGE = (64, 80)


def _batch() -> dict[str, torch.Tensor]:
    boxes = torch.tensor([[0.4, 0.5, 0.5, 0.6], [0.6, 0.4, 0.4, 0.5]])
    corners = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    polygons = boxes[:, None, :2] + corners.repeat(2, 1)[None] * boxes[:, None, 2:]  # (2, 8, 2): each corner twice
    return {
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": boxes,
        "polygons": polygons,
        "polygon_mask": torch.ones(2, 8, dtype=torch.bool),
    }


def _story(step, loss_factory=None):
    """One batch with an inf activation in every level (its step is skipped), three normal steps, then eval."""
    subject = mutants.subject(mutants.R0_SPEC)
    head = subject.build_head()
    loss = (loss_factory or subject.build_loss)(head)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(shape, generator=gen) for shape in subject.feature_shapes(IMAGE, 2)]
    poisoned = [f.clone() for f in feats]
    for f in poisoned:
        f[0, 0, 0, 0] = math.inf  # as an fp16 overflow under AMP would leave it, before the first BatchNorm
    batch = _batch()
    skipped = step(head, loss, optimizer, poisoned, batch, max_norm=10.0)
    normal = [step(head, loss, optimizer, feats, batch, max_norm=10.0) for _ in range(3)]
    bad_buffers = [name for name, buf in head.named_buffers() if not bool(torch.isfinite(buf).all())]
    head.eval()
    with torch.no_grad():
        y, _ = head(feats)
    return head, skipped, normal, bad_buffers, y


def test_symptom_training_looks_fine_eval_is_all_nan():
    head, skipped, normal, bad_buffers, y = _story(mutants.step_skips_without_restoring_buffers)
    assert skipped.skipped
    losses = [r.loss for r in normal]
    assert not any(r.skipped for r in normal) and all(math.isfinite(v) for v in losses), losses
    assert losses[0] > losses[1] > losses[2], f"training loss should fall as in the incident, got {losses}"
    assert all(".bn.running_" in name for name in bad_buffers) and bad_buffers, bad_buffers
    # Every output of every anchor of every image, as the [42, 10285, 1] tensor of NaN scores in the incident.
    assert int(torch.isnan(y).sum()) == y.numel(), f"{int(torch.isnan(y).sum())} of {y.numel()} eval outputs NaN"
    # The team's "fixes" were in place: clipping at 10 (max_norm above) and a zero final vertex bias at init.
    initial = mutants.subject(mutants.R0_SPEC).build_head()
    assert all(not bool(branch[-1].bias.detach().any()) for branch in initial.cv4)


def test_symptom_masking_nan_logits_in_the_loss_does_not_help():
    """The third "fix", NaN logits replaced by -10 in the loss (R8), leaves every eval output NaN as well."""
    masking_loss = mutants.PolygonLossMasksNonfinite.for_head
    *_, bad_buffers, y = _story(mutants.step_skips_without_restoring_buffers, masking_loss)
    assert bad_buffers
    assert bool(torch.isnan(y).all())


def test_restoring_buffers_of_the_skipped_step_cures_it():
    _, skipped, normal, bad_buffers, y = _story(training.train_step)
    assert skipped.skipped and not any(r.skipped for r in normal)
    assert bad_buffers == []
    assert bool(torch.isfinite(y).all())


def test_check_fails_on_mutant():
    message = mutants.failure_message(mutants.R0_SPEC, CHECK)
    assert "parameters/buffers are non-finite" in message and "bn.running_mean" in message, message


def test_check_passes_on_reference():
    mutants.assert_passes(mutants.REFERENCE, CHECK)

