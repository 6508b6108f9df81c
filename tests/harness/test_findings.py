"""A finding is reported as what it is: a prediction the loss leaves without a gradient is not a non-finite one."""

from __future__ import annotations

import heads
import losses
from headguard import CATALOGUE, HeadSpec
from headguard.runner import run_check
from headguard.targets import subject_from


def polygon_term_skipped_without_objects(head):
    """Skips the polygon term (and its input) on a batch with no objects, as several forks do."""
    full = losses.PolygonLoss.for_head(head)
    detection = losses.DetectionLoss.for_head(head)

    def loss(preds, batch):
        if len(batch["cls"]):
            return full(preds, batch)
        vector, items = detection({k: v for k, v in preds.items() if k != "polygons"}, batch)
        return vector, {**items, "polygon_loss": vector.new_zeros(())}

    return loss


def test_an_unused_branch_is_its_own_finding_with_its_consequence():
    subject = subject_from(HeadSpec(heads.Polygon, loss=polygon_term_skipped_without_objects), name="skips")
    result = run_check(subject, CATALOGUE["check_gradients_finite_when_loss_finite"], profile="ci")
    assert result.status == "failed"
    assert "leaves preds['polygons'] without a gradient (None)" in result.message
    assert "find_unused_parameters=True" in result.message and "non-finite" not in result.message
