"""Shape (polygon) losses: the detection terms must be the detection loss's (R3); the polygon loss must have a
finite, non-zero gradient at the head's initial output (R2)."""

from __future__ import annotations

import torch

from headguard import strategies as hs
from headguard.checks._common import (
    call,
    check,
    count_nonfinite,
    detached_preds,
    features,
    items_close,
    ordinary_targets,
    run_property,
    train_preds,
)
from headguard.registry import CheckFailure, CheckSkipped

DETECTION_ITEMS = ("box_loss", "cls_loss", "dfl_loss")


def _detection_loss(head):
    """The reference detection loss for this head: the oracle for the polygon loss's detection terms."""
    import losses

    return losses.DetectionLoss.for_head(head)


@check(area="shape_loss", requires=("polygons",))
def check_polygon_detection_terms_match(subject, ctx):
    """The box/cls/dfl items of the polygon loss equal the detection loss's on the same inputs (R3)."""
    head = subject.build_head()
    preds = detached_preds(train_preds(head, features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)))
    shape_loss, detection_loss = subject.build_loss(head), _detection_loss(head)
    bound = hs.from_head(subject)

    def inner(batch):
        _, poly_items = call("the polygon loss", shape_loss, preds, batch)
        det_batch = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}
        det_preds = {k: v for k, v in preds.items() if k != "polygons"}
        _, det_items = call("the detection loss", detection_loss, det_preds, det_batch)
        missing = [k for k in DETECTION_ITEMS if k in det_items and k not in poly_items]
        if missing:
            raise CheckFailure(
                f"the polygon loss's items lack {missing}; expected the detection loss's {list(det_items)} too"
            )
        shared = [k for k in DETECTION_ITEMS if k in det_items]
        bad = items_close({k: float(poly_items[k]) for k in shared}, {k: float(det_items[k]) for k in shared},
                          rtol=1e-5, atol=1e-7)
        if bad:
            raise CheckFailure(
                f"the polygon loss's detection terms differ from the detection loss's on the same inputs: "
                f"{'; '.join(bad)} (polygon loss vs detection loss); adding a shape term must not renormalise the "
                "class or box terms (normalise cls by max(1, sum of target scores), as the detection loss does)"
            )

    run_property(ctx, inner, bound.targets(batch_size=2, min_objects=0, max_objects=5))


@check(area="shape_loss", requires=("polygons",))
def check_polygon_gradient_at_init(subject, ctx):
    """The polygon loss's gradient w.r.t. the head's initial vertex output is finite and non-zero (R2)."""
    head = subject.build_head()
    preds = detached_preds(train_preds(head, features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)))
    preds["polygons"].requires_grad_(True)
    batch = ordinary_targets(subject, 2, per_image=2, seed=ctx.seed)
    vector, items = call("the polygon loss", subject.build_loss(head), preds, batch)
    if "polygon_loss" not in items:
        raise CheckSkipped(f"the loss reports no 'polygon_loss' item (items: {sorted(items)})")
    vector.sum().backward()
    grad = preds["polygons"].grad
    if grad is None or not bool(torch.isfinite(grad).all()):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is unusable ({count_nonfinite(grad)})"
            f" (polygon_loss = {float(items['polygon_loss']):.4g}): initial polygons are probably degenerate (all "
            "vertices at one point, a 0/0 in the loss); initialise the vertex branch so polygons have spread"
        )
    if not bool(grad.abs().sum() > 0):
        raise CheckFailure(
            f"the polygon loss's gradient at the initial output is exactly zero (polygon_loss = "
            f"{float(items['polygon_loss']):.4g}): the initial polygons sit at a stationary point (e.g. every "
            "vertex on one point after zeroing the vertex branch's final weights); they will never start to learn"
        )


