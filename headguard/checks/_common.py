"""Helpers shared by the checks: seeded inputs for a subject, running head + loss, finding branches and their final
convs, and turning a Hypothesis failure into a CheckFailure whose `example` is the falsifying example."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hypothesis import Phase, given, reproduce_failure, seed, settings
from hypothesis.database import ExampleDatabase
from hypothesis.errors import DidNotReproduce, HypothesisException
from torch import nn

from headguard import engine
from headguard.database import KeyedDatabase, open_database
from headguard.failures import from_group, with_example
from headguard.isolation import is_out_of_memory
from headguard.layouts import LayoutMismatch
from headguard.profiles import canonical, settings_for
from headguard.registry import CheckContext, CheckFailure, CheckSkipped
from headguard.registry import check as _register
from headguard.strategies import from_head, is_per_image
from headguard.tracing import locate_nonfinite
from headguard.training import all_finite

# Small images keep the anchor count A small (64 x 80 px -> A = 80 + 20 + 6 = 106 at strides 8/16/32).
IMAGE_SIZE = (64, 80)


# ------------------------------------------------------------------------------------------------- registration
def check(*, area: str, requires=(), gate: bool = False):
    """`headguard.registry.check`, running the check with one intra-op thread.

    Checks use tiny tensors, where intra-op threading costs more than it gains; on a shared 2-core CPU it is
    ruinous (measured: 10 train+eval forwards of Detect, batch 3, 64 px: 6.5 s with 2 threads, 0.18 s with 1).
    """

    def register(func):
        @functools.wraps(func)
        def single_threaded(subject, ctx):
            with _threads(1), engine.checking(getattr(subject, "name", ""), func.__name__):
                return func(subject, ctx)

        _register(area=area, requires=requires, name=func.__name__, gate=gate)(single_threaded)
        return func

    return register


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------------------- inputs
def features(
    subject, *, batch: int = 2, image_size=IMAGE_SIZE, seed: int = 0, scale: float = 1.0
) -> list[torch.Tensor]:
    """Seeded standard-normal feature maps (times `scale`) with the shapes the subject expects for `image_size`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * scale for shape in subject.feature_shapes(image_size, batch)]


def ordinary_targets(subject, batch: int, *, per_image: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded, unremarkable objects: boxes 30-60 % of the image, convex polygons inscribed in them, and the targets of
    the head's other tasks for those boxes (visible keypoints, rotated boxes, masks: `strategies.task_targets`)."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * per_image
    wh = 0.3 + 0.3 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    out = {
        "batch_idx": torch.arange(batch).repeat_interleave(per_image).float(),
        "cls": torch.randint(0, subject.nc, (n, 1), generator=gen).float(),
        "bboxes": torch.cat((centre, wh), 1),
    }
    npv = subject.num_vertices
    if npv:
        angle = torch.arange(npv) * (2 * math.pi / npv) + torch.rand(n, 1, generator=gen)
        out["polygons"] = torch.stack(
            (centre[:, :1] + wh[:, :1] / 2 * angle.cos(), centre[:, 1:] + wh[:, 1:] / 2 * angle.sin()), -1
        )
        out["polygon_mask"] = torch.ones(n, npv, dtype=torch.bool)
    return from_head(subject).task_targets(out, batch_size=batch, seed=seed)


def select_images(batch: Mapping[str, torch.Tensor], images: list[int]) -> dict[str, torch.Tensor]:
    """The objects of `images` (in that order), re-indexed 0..len(images)-1; per-image entries (index masks) are
    taken by image, their values (indices within each image) stay valid."""
    rows, idx = [], []
    for new, old in enumerate(images):
        r = (batch["batch_idx"] == old).nonzero().flatten()
        rows.append(r)
        idx.append(torch.full((len(r),), float(new)))
    rows_t = torch.cat(rows)
    out = {k: v[torch.tensor(images)] if is_per_image(k, v) else v[rows_t] for k, v in batch.items()
           if k != "batch_idx"}
    out["batch_idx"] = torch.cat(idx)
    return out


def anchor_grid(feats, strides) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre anchors (A, 2) as (x, y) in grid units and strides (A,), float64, levels in order, row-major.

    Written here rather than imported from the reference heads, so a check never inherits a head's own anchor bug.
    """
    points, steps = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[-2:]
        gy, gx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2).double())
        steps.append(torch.full((h * w,), float(s), dtype=torch.float64))
    return torch.cat(points), torch.cat(steps)


def detached_preds(preds: Mapping[str, Any], *, requires_grad: bool = False, dtype=None) -> dict[str, Any]:
    """Leaf copies of the head's prediction tensors, so gradients can be read and inputs compared."""
    out = {}
    for k, v in preds.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if dtype is not None:
                t = t.to(dtype)
            out[k] = t.requires_grad_(requires_grad)
        elif isinstance(v, list):
            out[k] = [t.detach().clone() for t in v]
        else:
            out[k] = v
    return out


def fit_boxes_to_first_object(preds: Mapping[str, Any], batch: Mapping[str, torch.Tensor], strides) -> dict[str, Any]:
    """Predictions whose DFL boxes reproduce each image's FIRST object exactly at every anchor inside it.

    Why: losses normalise by max(1, sum of target scores); at init that sum is often below 1, and the clamp then
    breaks scale properties (replication) for a reason that is not a bug. With one object fitted (IoU ~ 1 at its
    anchors) the sum is >= 1 per image, so the clamp is inactive. Distances are written as a two-bin mix, whose
    softmax expectation is the exact distance (clipped to the DFL range).
    """
    out = dict(preds)
    boxes = preds["boxes"]
    b, c, a = boxes.shape
    reg_max = c // 4
    if reg_max < 2:
        return out
    feats = preds["feats"]
    anchor, stride = anchor_grid(feats, strides)
    img_h, img_w = feats[0].shape[-2] * float(strides[0]), feats[0].shape[-1] * float(strides[0])
    logits = torch.full((b, 4, reg_max, a), -30.0)
    for i in range(b):
        rows = (batch["batch_idx"] == i).nonzero().flatten()
        if len(rows) == 0:
            continue
        cx, cy, w, h = batch["bboxes"][rows[0], :4].double().tolist()  # xywh (an OBB's angle column follows)
        x1, y1, x2, y2 = (cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h
        px, py = anchor[:, 0] * stride, anchor[:, 1] * stride
        ltrb = torch.stack((px - x1, py - y1, x2 - px, y2 - py)) / stride  # (4, A) in cells
        ltrb = ltrb.clamp(0, reg_max - 1 - 1e-4)
        low = ltrb.floor().long()
        frac = ltrb - low
        sel = torch.arange(a)
        for side in range(4):
            logits[i, side, low[side], sel] = torch.log((1 - frac[side]).clamp(min=1e-12)).float()
            logits[i, side, low[side] + 1, sel] = torch.log(frac[side].clamp(min=1e-12)).float()
    out["boxes"] = logits.view(b, c, a).to(boxes.dtype)
    return out


def train_preds(subject, head: nn.Module, feats) -> dict[str, Any]:
    """The named outputs (see `headguard.layouts`) of the head's training forward on `feats`."""
    head.train()
    out = call("the head's training forward", head, list(feats))
    try:
        return subject.train_outputs(out)
    except LayoutMismatch as err:
        raise CheckFailure(str(err)) from None


def eval_outputs(subject, head: nn.Module, feats, *, what: str = "the head's eval forward"):
    """(y, named outputs) of the head's eval forward on `feats` (the head is put in eval mode, gradients off)."""
    head.eval()
    with torch.no_grad():
        out = call(what, head, list(feats))
    try:
        return subject.eval_outputs(out)
    except LayoutMismatch as err:
        raise CheckFailure(str(err)) from None


def call(what: str, fn: Callable, *args, **kwargs):
    """Run `fn`; an exception becomes a CheckFailure naming `what` (the head or loss raised on valid input), except
    an allocation failure, which is the machine's limit, not the subject's bug."""
    try:
        return fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as err:  # noqa: BLE001  (any error on valid input is the finding)
        if is_out_of_memory(err):
            raise
        raise CheckFailure(f"{what} raised {type(err).__name__} on valid input: {err}") from err


def first_bad_gradient(grads: Mapping[str, torch.Tensor | None]) -> str | None:
    """The key of the first gradient that holds a non-finite value, else None (a missing gradient is not
    non-finite: see `missing_gradient`)."""
    return next((k for k, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())), None)


def missing_gradient(grads: Mapping[str, torch.Tensor | None], *, situation: str) -> CheckFailure | None:
    """The finding for the first prediction the loss left without a gradient (None), else None. Its own finding,
    not a non-finite one: the value is fine, the branch is simply unused in that step."""
    key = next((k for k, g in grads.items() if g is None), None)
    if key is None:
        return None
    return CheckFailure(
        f"the loss leaves preds[{key!r}] without a gradient (None) {situation}: that branch is unused in such a "
        "step, and under DistributedDataParallel without find_unused_parameters=True the step fails; keep the "
        "term in the graph (multiply it by zero instead of skipping it)"
    )


def count_nonfinite(t: torch.Tensor | None) -> str:
    if t is None:
        return "no gradient at all (None)"
    bad = int((~torch.isfinite(t)).sum())
    return f"{bad} of {t.numel()} values non-finite"


def items_close(a: Mapping, b: Mapping, *, rtol: float, atol: float) -> list[str]:
    """Names (with values) of items that differ beyond tolerance; also reports different keys."""
    if set(a) != set(b):
        return [f"item keys differ: {sorted(a)} vs {sorted(b)}"]
    bad = []
    for k in a:
        x, y = float(a[k]), float(b[k])
        if not (math.isclose(x, y, rel_tol=rtol, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
            bad.append(f"{k}: {x:.6g} vs {y:.6g}")
    return bad


def where_nonfinite(head: nn.Module, run: Callable[[nn.Module], Any], *, backward: bool = True) -> str:
    """' (first non-finite value in cv2.0.1.bn during the forward pass: ...)', or '' when it cannot be located."""
    try:
        origin = locate_nonfinite(head, run, backward=backward)
    except Exception:  # noqa: BLE001  (locating is a courtesy; the finding stands without it)
        return ""
    return f" ({origin})" if origin is not None else ""


# ---------------------------------------------------------------------------------------------- head structure
def branches(head: nn.Module, levels: int) -> list[tuple[str, nn.ModuleList]]:
    """Top-level ModuleList children with one item per level, each containing a Conv2d: the per-level branches."""
    found = []
    for name, child in head.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == levels:
            if all(any(isinstance(m, nn.Conv2d) for m in item.modules()) for item in child):
                found.append((name, child))
    return found


def final_convs(head: nn.Module, feats) -> list[tuple[str, int, str, nn.Conv2d]]:
    """(branch, level, qualified name, conv) of the LAST Conv2d each branch item runs, in execution order.

    Found by hooking every Conv2d during one training forward, not by `[-1]` indexing, so branches built from
    nested Sequentials or custom blocks are handled the same way.
    """
    order: list[nn.Module] = []
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(lambda mod, a, o: order.append(mod)) for m in convs]
    try:
        with torch.no_grad():
            head.train()(list(feats))
    finally:
        for h in handles:
            h.remove()
    names = {m: n for n, m in head.named_modules()}
    out = []
    for bname, blist in branches(head, len(feats)):
        for level, item in enumerate(blist):
            members = {m for m in item.modules() if isinstance(m, nn.Conv2d)}
            ran = [m for m in order if m in members]
            if ran:
                out.append((bname, level, names[ran[-1]], ran[-1]))
    return out


def branch_by_out_channels(finals, out_channels: int) -> list[str]:
    """Names of branches whose final convs all produce `out_channels` channels."""
    by_branch: dict[str, list[int]] = {}
    for bname, _level, _name, conv in finals:
        by_branch.setdefault(bname, []).append(conv.out_channels)
    return [b for b, outs in by_branch.items() if all(o == out_channels for o in outs)]


def configured_prior(head: nn.Module, level: int, stride: float) -> float:
    """The head's own `class_prior(level)` when it has one, else the Ultralytics convention it documents:
    5 objects per 640 px image spread over nc classes and (640 / stride)^2 cells."""
    if callable(getattr(head, "class_prior", None)):
        return float(head.class_prior(level))
    return 5.0 / head.nc / (640.0 / stride) ** 2


# ------------------------------------------------------------------------------------------------- Hypothesis
def run_property(ctx: CheckContext, inner: Callable, *strategies, max_examples: int | None = None, **kw) -> None:
    """Run `inner(*drawn)` under the active profile (seeded with ctx.seed), with the example database and the other
    options the faces set (`headguard.engine`). `max_examples` caps the profile's count for costly checks.

    A CheckFailure comes back with Hypothesis' "Falsifying example" note as `example`; several distinct ones, each
    shrunk on its own, as `DistinctFailures`. A crash (the subject or the check raised: an exception that is not a
    CheckFailure, or a CheckFailure raised from one, as `call` does) ends the search at once, unshrunk: exploring
    and shrinking an exception costs tens of seconds and says no more than the first one.
    """
    key = engine.next_key(inner.__name__)
    options = engine.current()
    if options.replay is not None and options.replay.check == key.check:
        _replay(ctx, key, options, inner, strategies, kw)
        return
    search = _Search(inner, key)
    try:
        _hypothesis_test(ctx, key, options, search.guarded, strategies, kw, max_examples=max_examples)()
    except _DeadlineReached:
        return
    except _Crashed as crash:
        raise _crash_report(ctx, key, options, search, crash, strategies, kw, max_examples=max_examples) from None
    except CheckFailure as err:
        raise with_example(err) from None
    except BaseExceptionGroup as group:  # several distinct failures, each shrunk
        merged = from_group(group)
        if merged is None:
            raise
        raise merged from None


def _hypothesis_test(ctx, key, options, func, strategies, kw, *, max_examples=None, **changes) -> Callable[[], None]:
    base = settings_for(ctx.profile)
    count = base.max_examples if max_examples is None else min(base.max_examples, max_examples)
    # `seed` turns the database off in the settings it sees, so ours are applied over it. Shrinking stays on in
    # every profile: the report promises the smallest failing input, and on the catalogue's small drawn recipes it
    # costs seconds (benchmarks/time_to_verdict.py: every mutant's verdict under 5 s). The blob is printed for
    # --save-regressions, which replays it.
    # Hypothesis' explain phase (which parts of a failing example matter) took a failing check from 0.1-1.8 s to
    # 1.5-50 s (shape-loss and absolute-loss mutants, measured); it runs only in the fuzz profile, where time is cheap.
    phases = base.phases if canonical(ctx.profile) == "headguard-fuzz" else tuple(
        p for p in base.phases if p is not Phase.explain)
    chosen = settings(base, **{"max_examples": max(1, count), "database": _database(ctx, key, options),
                               "print_blob": True, "report_multiple_bugs": True, "phases": phases, **changes})
    return chosen(seed(ctx.seed)(given(*strategies, **kw)(func)))


def _database(ctx, key, options) -> ExampleDatabase | None:
    db = open_database(None, profile=ctx.profile) if options.database is engine.DEFAULT else options.database
    return None if db is None else KeyedDatabase(db, key)


class _Crashed(BaseException):
    """Carries the first crash out of Hypothesis (a BaseException, so it neither explores nor shrinks it)."""

    def __init__(self, error: BaseException, call: str):
        super().__init__(str(error))
        self.error = error
        self.call = call


class _DeadlineReached(BaseException):
    """The face's deadline passed before an example started (`headguard fuzz` ends the property there)."""


def is_crash(err: BaseException) -> bool:
    """An exception that says the subject or the check raised, rather than that a property is false."""
    if isinstance(err, CheckFailure):
        cause = err.__cause__
        return isinstance(cause, Exception) and not isinstance(cause, (CheckFailure, HypothesisException))
    return isinstance(err, Exception) and not isinstance(err, HypothesisException)


class _Search:
    """`inner` as the property Hypothesis searches: counts the examples, stops at the deadline unless something has
    failed (it is shrinking), and turns the first crash into `_Crashed`."""

    def __init__(self, inner: Callable, key: engine.PropertyKey):
        self.inner, self.key = inner, key
        self.failures_seen = 0
        self.guarded = functools.wraps(inner)(lambda *args, **kwargs: self._run(*args, **kwargs))

    def _run(self, *args, **kwargs):
        if not self.failures_seen and engine.past_deadline():
            raise _DeadlineReached
        engine.count_example(self.key)
        try:
            return self.inner(*args, **kwargs)
        except Exception as err:
            if is_crash(err):
                raise _Crashed(err, _call_text(self.inner, args, kwargs)) from err
            if isinstance(err, CheckFailure):
                self.failures_seen += 1
            raise


def _crash_report(ctx, key, options, search: _Search, crash: _Crashed, strategies, kw, *,
                  max_examples: int | None) -> BaseException:
    """The crash with Hypothesis' own account of the input: the same seeded search again, with no shrink phase and
    property failures let pass, stops at the same first crash. When the rerun does not crash (a subject that is not
    deterministic), the crash is reported with the repr of its arguments."""

    def crash_only(*args, **kwargs):
        try:
            return search.inner(*args, **kwargs)
        except CheckFailure as err:
            if is_crash(err):
                raise
            return None

    rerun = _hypothesis_test(ctx, key, options, functools.wraps(search.inner)(crash_only), strategies, kw,
                             max_examples=max_examples, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                             report_multiple_bugs=False)
    try:
        rerun()
    except Exception as err:  # noqa: BLE001  (the crash, now with Hypothesis' note of its input)
        found = with_example(err) if isinstance(err, CheckFailure) else err
    else:
        found = crash.error
        if isinstance(found, CheckFailure):
            found = CheckFailure(found.message, example=f"Falsifying example: {crash.call}", reproduce=found.reproduce)
        else:
            found.add_note(f"Falsifying example: {crash.call}")
    if search.failures_seen:
        found.add_note(f"before this crash the property also failed on {search.failures_seen} input(s), not shrunk: "
                       "fix the crash and run again to see them")
    return found


def _call_text(func: Callable, args, kwargs) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{func.__name__}({', '.join(parts)})"


def _replay(ctx, key, options, inner, strategies, kw) -> None:
    """Run the one input of `options.replay` (a `@reproduce_failure` blob); an input on which the property now holds
    passes (Hypothesis would call that DidNotReproduce)."""
    held = []

    def once(*args, **kwargs):
        inner(*args, **kwargs)
        held.append(True)

    test = _hypothesis_test(ctx, key, options, functools.wraps(inner)(once), strategies, kw)
    try:
        reproduce_failure(options.replay.version, options.replay.blob)(test)()
    except DidNotReproduce:
        if not held:
            raise
    except CheckFailure as err:
        raise with_example(err) from None


__all__ = [
    "CheckFailure",
    "CheckSkipped",
    "IMAGE_SIZE",
    "all_finite",
    "anchor_grid",
    "branch_by_out_channels",
    "branches",
    "call",
    "check",
    "configured_prior",
    "count_nonfinite",
    "detached_preds",
    "eval_outputs",
    "features",
    "final_convs",
    "first_bad_gradient",
    "missing_gradient",
    "items_close",
    "ordinary_targets",
    "is_crash",
    "run_property",
    "select_images",
    "train_preds",
    "where_nonfinite",
]
