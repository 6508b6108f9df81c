"""The training step: clipping really bounds the update, a skipped step leaves the model finite (R0), and a few
dozen reference steps on synthetic data neither blow up nor diverge (the canary, with its curves saved)."""

from __future__ import annotations

import math

import torch

from headguard.testing import (
    all_finite, call, check, eval_outputs, features, ordinary_targets, where_nonfinite,
)
from headguard.registry import CheckFailure

CANARY_STEPS = 30
# "No divergence", with bounds set from measurements. The task-aligned assigner re-labels anchors as predictions move,
# so even a healthy run is not monotone: on the reference heads (30 target seeds each, 30 steps) the peak loss reached
# 1.97 x the initial one and the final loss 1.34 x. A broken step (lr doubling every call) peaks at >= 3,000 x and
# then saturates back to ~0, so the peak is judged as well as the end.
PEAK_FACTOR = 10.0
FINAL_FACTOR = 2.0


def _nonfinite_state(head) -> list[str]:
    named = list(head.named_parameters()) + list(head.named_buffers())
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _snapshot(head) -> list[torch.Tensor]:
    return [p.detach().clone() for p in head.parameters()]


def _rounding_slack(head) -> float:
    """How far float rounding alone can move the parameters in L2 when a step writes them back: each element of a
    tensor of dtype d rounds by at most eps(d) times its magnitude, so the L2 sum over every tensor is
    sqrt(sum((eps(d) * ||p||)^2)). It grows with the parameter count and the dtype's eps; on a small float32 head it is
    ~1e-7, on a 242 M-parameter one it exceeds a 1e-4 update (measured: 0.001002 against 0.001 before this slack)."""
    squares = sum((torch.finfo(p.dtype).eps * float(torch.linalg.vector_norm(p.detach().double()))) ** 2
                  for p in head.parameters() if p.is_floating_point())
    return math.sqrt(squares)


def _distance(head, before) -> float:
    squares = (((p.detach().double() - b.double()) ** 2).sum() for p, b in zip(head.parameters(), before))
    return float(torch.sqrt(sum(squares)))


def _step(subject, head, loss, opt, feats, batch, **kwargs):
    return call("the training step", subject.train_step, head, loss, opt, feats, batch, **kwargs)


@check(area="training")
def check_clipping_bounds_update(subject, ctx):
    """After clipping, one SGD step moves the parameters by at most lr * max_norm; NaN gradients skip the step.

    The total gradient norm left after the step is at most max_norm, the L2 move at most lr * max_norm; a step whose
    gradients are non-finite while its loss is finite is reported skipped and changes no parameter."""
    feats = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    batch = ordinary_targets(subject, 2, seed=ctx.seed)
    for lr, max_norm in ((0.1, 1e-3), (0.01, 0.1), (1.0, 10.0)):
        head = subject.build_head()
        loss = subject.build_loss(head)
        opt = torch.optim.SGD(head.parameters(), lr=lr)
        before = _snapshot(head)
        result = _step(subject, head, loss, opt, feats, batch, max_norm=max_norm)
        if result.skipped:
            raise CheckFailure(f"the training step skipped an ordinary finite batch (loss {result.loss:.4g}); only "
                               "non-finite losses or gradients may be skipped")
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        if grads:  # a step may leave its clipped gradients in .grad; if so, they must be within max_norm in total
            total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))
            if total > max_norm * (1 + 1e-3) + 1e-9:
                raise CheckFailure(
                    f"after the step, the gradients' total L2 norm is {total:.4g} with max_norm={max_norm:g}: clipping "
                    "did not bound the TOTAL norm (clip_grad_norm_ over all parameters at once, not tensor by tensor)"
                )
        moved = _distance(head, before)
        # Allow relative rounding of the clip coefficient and the update, plus the rounding of writing the parameters.
        if moved > lr * max_norm * (1 + 1e-3) + _rounding_slack(head):
            raise CheckFailure(
                f"one SGD step (lr={lr:g}) with max_norm={max_norm:g} moved the parameters by {moved:.4g} in L2, more "
                f"than lr * max_norm = {lr * max_norm:.4g} (reported gradient norm {result.grad_norm:.4g}): the step "
                "does not clip the total gradient norm before optimizer.step() (clip_grad_norm_ over ALL parameters)"
            )
    _check_nonfinite_gradient_skipped(subject, feats, batch)


def _check_nonfinite_gradient_skipped(subject, feats, batch):
    head = subject.build_head()
    loss = subject.build_loss(head)

    def poisoned(preds, batch_):
        vector, items = loss(preds, batch_)
        # sqrt at 0 has an infinite derivative, times the 0 from `* 0.0`: NaN gradients with a finite loss value.
        scores = subject.train_outputs(preds)["scores"]
        return vector + torch.sqrt(scores.sum() * 0.0), items

    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    before = _snapshot(head)
    result = _step(subject, head, poisoned, opt, feats, batch)
    moved = _distance(head, before)
    if not result.skipped or not math.isfinite(moved) or moved > 0:
        raise CheckFailure(
            f"a step with NaN gradients (finite loss {result.loss:.4g}) was {'not ' if not result.skipped else ''}"
            f"reported skipped and moved the parameters by {moved:.4g}; check the gradient norm for finiteness and "
            "skip optimizer.step() when it is not (clipping NaN gradients still gives NaN)"
        )


def _overflowing(feats):
    """The same maps with one +inf per level: every conv that sees it produces a non-finite activation."""
    bad = [f.clone() for f in feats]
    for f in bad:
        f[0, 0, 0, 0] = math.inf
    return bad


@check(area="training")
def check_skipped_step_leaves_model_finite(subject, ctx):
    """After a skipped step on overflowing activations, every parameter/buffer and the eval output stay finite (R0).

    One batch with an inf in every level's features, then two normal steps (train mode hides poisoned statistics);
    then every parameter and buffer must be finite and an eval forward on a fixed input finite."""
    head = subject.build_head()
    loss = subject.build_loss(head)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    good = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    batch = ordinary_targets(subject, 2, seed=ctx.seed)
    try:
        result = subject.train_step(head, loss, opt, _overflowing(good), batch)
    except Exception as err:  # noqa: BLE001  (a crash on a bad batch is the finding)
        raise CheckFailure(
            f"the training step raised {type(err).__name__} on a batch with a non-finite activation ({err}); it must "
            "skip the update and restore the buffers its forward pass changed"
        ) from err
    poisoned = _nonfinite_state(head)
    for _ in range(2):  # later batches train normally in train mode: the poison only shows in eval (R0)
        _step(subject, head, loss, opt, good, batch)
    poisoned = poisoned or _nonfinite_state(head)
    if poisoned:
        raise CheckFailure(
            f"after a {'skipped' if result.skipped else 'NOT skipped'} step on a batch with a non-finite activation, "
            f"{len(poisoned)} parameters/buffers are non-finite, e.g. {poisoned[:4]}: the forward pass wrote inf/NaN "
            "into BatchNorm running statistics and the step did not restore them; snapshot every buffer before the "
            "forward and copy it back when the step is skipped (gradient clipping or a zero bias does not help)"
        )
    fixed = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed + 7)
    y, _ = eval_outputs(subject, head, fixed)
    if not all_finite(y):
        where = where_nonfinite(head, lambda m: m(list(fixed)), backward=False)
        raise CheckFailure(
            f"after a skipped step the eval output is non-finite ({int((~torch.isfinite(y)).sum())} of {y.numel()} "
            f"values){where}; restore the buffers the skipped step's forward changed"
        )


@check(area="training")
def check_training_canary(subject, ctx):
    """A few dozen reference steps on one synthetic batch: nothing non-finite, no divergence, BN buffers finite.

    SGD lr 0.01 momentum 0.9, 30 steps: every loss finite, no step skipped, peak loss <= 10 x and final <= 2 x the
    initial one, parameters and buffers finite at the end. The curves (the loss and each of its items per step, the
    gradient norm, the range of the BatchNorm running statistics) are recorded as the series "canary": `--plots DIR`
    draws them."""
    head = subject.build_head()
    loss = subject.build_loss(head)
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    feats = features(subject, batch=2, image_size=(64, 64), seed=ctx.seed)
    batch = ordinary_targets(subject, 2, seed=ctx.seed)
    items: dict[str, float] = {}

    def tracked(preds, batch_):
        vector, step_items = loss(preds, batch_)
        items.update({k: float(v) for k, v in step_items.items()})
        return vector, step_items

    curve: dict[str, list[float]] = {"loss": []}
    failure = None
    for step in range(CANARY_STEPS):
        items.clear()
        r = _step(subject, head, tracked, opt, feats, batch)
        _extend(curve, step, {"loss": r.loss, **items, "grad_norm": r.grad_norm, "skipped": float(r.skipped),
                              **_batchnorm_range(head)})
        if r.skipped or not math.isfinite(r.loss):
            failure = (
                f"training step {step} on a fixed synthetic batch produced a non-finite loss or gradient (loss "
                f"{r.loss:.4g}, gradient norm {r.grad_norm:.4g}, skipped={r.skipped}) with SGD lr 0.01 momentum 0.9"
            )
            break
    ctx.record("canary", curve)
    loss0 = curve["loss"][0] if curve["loss"] else math.nan
    peak = max(range(len(curve["loss"])), key=lambda i: curve["loss"][i])
    bounded = curve["loss"][peak] <= PEAK_FACTOR * loss0 and curve["loss"][-1] <= FINAL_FACTOR * loss0
    if failure is None and not bounded:
        failure = (
            f"the loss diverged on a fixed synthetic batch: {loss0:.4g} at step 0, {curve['loss'][peak]:.4g} at step "
            f"{peak}, {curve['loss'][-1]:.4g} at the end (allowed: peak <= {PEAK_FACTOR:g} x and end <= "
            f"{FINAL_FACTOR:g} x the initial loss) with SGD lr 0.01 momentum 0.9: check the step (learning rate, "
            "clipping), the loss scale (gains, normalisation) and the gradient of each branch"
        )
    bad = _nonfinite_state(head)
    if failure is None and bad:
        failure = f"after {CANARY_STEPS} finite steps {len(bad)} parameters/buffers are non-finite, e.g. {bad[:4]}"
    if failure:
        raise CheckFailure(f"{failure} (headguard check --plots DIR draws the curves)")


def _extend(curve: dict[str, list[float]], step: int, values: dict[str, float]) -> None:
    """Append step `step`'s values; a series that starts late (an item absent at first) gets NaN gaps before."""
    for key, value in values.items():
        curve.setdefault(key, [math.nan] * step).append(float(value))


def _batchnorm_range(head) -> dict[str, float]:
    """The smallest and largest running mean and variance over every layer that keeps running statistics (the
    BatchNorms; NaN propagates, so a poisoned buffer shows)."""
    norms = [m for m in head.modules()
             if getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None]
    if not norms:
        return {}
    means = torch.cat([m.running_mean.detach().flatten() for m in norms]).double()
    variances = torch.cat([m.running_var.detach().flatten() for m in norms]).double()
    return {"bn_mean_min": float(means.min()), "bn_mean_max": float(means.max()),
            "bn_var_min": float(variances.min()), "bn_var_max": float(variances.max())}


__all__ = [
    "check_clipping_bounds_update",
    "check_skipped_step_leaves_model_finite",
    "check_training_canary",
]
