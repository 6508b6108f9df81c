"""The losses' fast path (the CUDA default; `cuda_graphs=True` anywhere) computes the reference loss
(`cuda_graphs=False`): same vector, same gradients, same errors.

On the CPU the fast path runs its static core eagerly (with the fused kernels' pure-torch specs), which is exactly what
a CUDA graph replays; the CUDA-marked tests at the end check capture, replay and the default's choice where a GPU
exists.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headguard.strategies import feature_maps, invalid_targets, targets
from heads import Polygon
from losses import DetectionLoss, LossInputError, PolygonLoss, mgiou
from losses._fast import (
    MIN_ROW_CAPACITY,
    SLOT_MULTIPLE,
    FastPath,
    gather_anchors,
    padded_slot_count,
    positive_index,
    row_capacity,
)
from losses._graphs import GraphedCore
from losses._validate import check_finite, check_range, deferred_checks

STRIDES = (8.0, 16.0, 32.0)
CHANNELS = (8, 16, 32)
NC, NP = 3, 6
MODES = ["detection", "l2", "mgiou", "hybrid"]
TOL = 1e-5


def _criteria(mode: str):
    """(reference, fast) criteria of one mode."""
    if mode == "detection":
        return DetectionLoss(NC, STRIDES, cuda_graphs=False), DetectionLoss(NC, STRIDES, cuda_graphs=True)
    return (PolygonLoss(NC, STRIDES, np=NP, mode=mode, cuda_graphs=False),
            PolygonLoss(NC, STRIDES, np=NP, mode=mode, cuda_graphs=True))


@functools.cache
def _head() -> Polygon:
    torch.manual_seed(0)
    head = Polygon(nc=NC, np=NP, ch=CHANNELS)
    head.stride = torch.tensor(STRIDES)
    head.bias_init()
    return head.train()


def _head_outputs(feats, seed: int, spread: float) -> dict:
    """A Polygon head's training output on `feats`, scaled and jittered, as leaf tensors with their own gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = _head()(feats)
    preds = {
        k: (v * spread + 0.1 * torch.randn(v.shape, generator=gen)).requires_grad_()
        for k, v in out.items() if k != "feats"
    }
    preds["feats"] = out["feats"]
    return preds


def _evaluate(criterion, mode, preds, batch, progress):
    for v in preds.values():
        if isinstance(v, torch.Tensor):
            v.grad = None
    if mode == "detection":
        loss, items = criterion(preds, batch)
    else:
        loss, items = criterion(preds, batch, progress)
    loss.sum().backward()
    grads = {k: v.grad.clone() for k, v in preds.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    return loss.detach(), items, grads


@st.composite
def loss_cases(draw):
    feats = draw(feature_maps(CHANNELS, STRIDES, max_batch=3, magnitudes=st.just(1.0), fills=("normal",)))
    batch = draw(targets(NC, batch_size=feats[0].shape[0], num_vertices=NP, max_objects=12))
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))  # logits near and far from the initial output
    progress = draw(st.floats(0.0, 1.0))
    if draw(st.booleans()) and bool(batch["polygon_mask"].all()):
        del batch["polygon_mask"]  # the fast path takes a mask-free MGIoU branch then
    return feats, batch, seed, spread, progress


@pytest.mark.parametrize("mode", MODES)
@settings(deadline=None)  # the first example builds the head
@given(case=loss_cases())
def test_fast_path_matches_reference(mode, case):
    feats, batch, seed, spread, progress = case
    preds = _head_outputs(feats, seed, spread)
    reference, fast = _criteria(mode)
    ref_loss, ref_items, ref_grads = _evaluate(reference, mode, preds, batch, progress)
    fast_loss, fast_items, fast_grads = _evaluate(fast, mode, preds, batch, progress)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=TOL, atol=TOL)
    _assert_items_close(fast_items, ref_items)
    assert fast_grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = float(ref.abs().max()) or 1.0
        torch.testing.assert_close(fast_grads[name], ref, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{name}: {m}")


def _assert_items_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=TOL, atol=TOL, msg=lambda m: f"item {name}: {m}")


def _no_images(device: str) -> tuple[dict, dict]:
    """Head outputs and a batch with no image (B = 0), on `device`."""
    feats = [torch.randn(1, c, 64 // int(s), 64 // int(s), generator=torch.Generator().manual_seed(c)) for c, s in
             zip(CHANNELS, STRIDES)]
    full = _head_outputs(feats, seed=0, spread=1.0)
    preds = {k: (v[:0].detach().to(device).requires_grad_() if k != "feats" else [f[:0].to(device) for f in v])
             for k, v in full.items()}
    empty = {"batch_idx": torch.zeros(0, dtype=torch.long), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4),
             "polygons": torch.zeros(0, NP, 2)}
    return preds, {k: v.to(device) for k, v in empty.items()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", MODES)
def test_fast_path_equals_reference_on_a_batch_of_no_images(mode, device):
    """B = 0 (an empty last batch): the reference gives zero terms and empty gradients, and a loss built for the fast
    path hands the call to it (on the GPU the graphs' padding rows would name image 0, which does not exist; the
    fast path's items, the loss over B, would be 0 / 0)."""
    preds, empty = _no_images(device)
    reference, fast = _criteria(mode)
    ref_loss, ref_items, ref_grads = _evaluate(reference, mode, preds, empty, 0.5)
    fast_loss, fast_items, fast_grads = _evaluate(fast, mode, preds, empty, 0.5)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=0, atol=0)
    _assert_items_close(fast_items, ref_items)
    assert {k: g.shape for k, g in fast_grads.items()} == {k: g.shape for k, g in ref_grads.items()}


def _raised(fn) -> tuple[str, str] | None:
    try:
        fn()
    except LossInputError as exc:
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.parametrize("mode", ["detection", "mgiou"])
@settings(deadline=None)
@given(case=invalid_targets(NC, batch_size=2, num_vertices=NP), seed=st.integers(0, 2**16))
def test_fast_path_rejects_what_the_reference_rejects(mode, case, seed):
    _kind, batch = case
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s)) for c, s in zip(CHANNELS, STRIDES)]
    preds = _head_outputs(feats, seed, 1.0)
    reference, fast = _criteria(mode)
    call = (lambda c, b: c(preds, b)) if mode == "detection" else (lambda c, b: c(preds, b, 0.5))
    expected = _raised(lambda: call(reference, batch))
    assert expected is not None, "the reference accepted an invalid batch; the strategy or the loss changed"
    assert _raised(lambda: call(fast, batch)) == expected
    call(fast, _small_batch())  # from now on the core is queued before the checks are read
    assert _raised(lambda: call(fast, batch)) == expected


def _small_batch() -> dict:
    """Two valid objects in two images."""
    return {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]),
            "polygons": torch.rand(2, NP, 2, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.4}


@pytest.mark.parametrize("key", ["scores", "boxes", "polygons"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fast_path_rejects_non_finite_predictions_like_the_reference(key, value):
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s)) for c, s in zip(CHANNELS, STRIDES)]
    preds = _head_outputs(feats, 0, 1.0)
    batch = _small_batch()
    reference, fast = _criteria("l2")
    fast(preds, batch)  # from now on the core is queued before the checks are read
    with torch.no_grad():
        preds[key].view(-1)[17] = value
    expected = _raised(lambda: reference(preds, batch))
    assert expected is not None and key in expected[1]
    assert _raised(lambda: _criteria("l2")[1](preds, batch)) == expected  # a first call: checks read first
    assert _raised(lambda: fast(preds, batch)) == expected


@pytest.mark.parametrize("mode", ["detection", "mgiou"])
def test_fast_path_redoes_a_core_queued_below_the_object_count(mode):
    """The core is queued at the largest padded count of the last calls; a batch with more objects per image is
    redone at its own count, one with fewer runs at the guess (padding slots), or at its slots' capacity where that is
less: the reference's loss each time."""
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s)) for c, s in zip(CHANNELS, STRIDES)]
    preds = _head_outputs(feats, 0, 1.0)
    small = _small_batch()
    many = {k: v.repeat((9,) + (1,) * (v.ndim - 1)) for k, v in small.items()}  # 9 objects in each image
    many["batch_idx"][:12] = 0.0  # 12 in image 0: padded to 16 slots
    spread = {k: v.repeat((8,) + (1,) * (v.ndim - 1)) for k, v in small.items()}  # 8 per image: 8 slots of 16
    reference, fast = _criteria(mode)
    fast._fast = path = FastPath(fast.detection if mode != "detection" else fast, None if mode == "detection" else fast)
    slot_counts = []
    run_core = path._run_core
    path._run_core = lambda preds, prepared, n, *rest: slot_counts.append(n) or run_core(preds, prepared, n, *rest)
    for batch, counts in ((small, [8]), (many, [8, 16]), (spread, [16]), (small, [8])):
        slot_counts.clear()
        ref, got = _evaluate(reference, mode, preds, batch, 0.3), _evaluate(fast, mode, preds, batch, 0.3)
        assert slot_counts == counts
        torch.testing.assert_close(got[0], ref[0], rtol=TOL, atol=TOL)
        for name, g in ref[2].items():
            torch.testing.assert_close(got[2][name], g, rtol=TOL, atol=TOL * max(1.0, float(g.abs().max())))


@settings(deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64), st.integers(0, 64))
def test_positive_index_lists_positives_in_nonzero_order(flags, extra):
    fg = torch.tensor(flags).reshape(1, -1)
    capacity = int(fg.sum()) + extra
    if capacity == 0:
        return
    index, valid = positive_index(fg, capacity)
    assert index.shape == valid.shape == (capacity,)
    assert torch.equal(index[valid], fg.reshape(-1).nonzero().flatten())
    assert int(valid.sum()) == int(fg.sum()) and not bool(valid[int(fg.sum()):].any())
    # Filler entries must not repeat one index: a repeated index serialises the gather's backward on the GPU.
    fillers = index[~valid]
    assert fillers.unique().numel() == fillers.numel()


@settings(deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9), st.data())
def test_gather_anchors_equals_advanced_indexing_in_value_and_gradient(b, c, a, data):
    k = data.draw(st.integers(0, 12))
    image = torch.tensor(data.draw(st.lists(st.integers(0, b - 1), min_size=k, max_size=k)), dtype=torch.long)
    anchor = torch.tensor(data.draw(st.lists(st.integers(0, a - 1), min_size=k, max_size=k)), dtype=torch.long)
    base = torch.randn(b, a, c, generator=torch.Generator().manual_seed(k))
    for x in (base.transpose(1, 2).contiguous(), base.transpose(1, 2)):  # contiguous and strided (B, C, A)
        x = x.detach().requires_grad_()
        weights = torch.randn(k, c, generator=torch.Generator().manual_seed(1))
        got = gather_anchors(x, image, anchor)
        (got * weights).sum().backward()
        grad_got, x.grad = x.grad, None
        want = x[image, :, anchor]
        (want * weights).sum().backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(grad_got, x.grad, rtol=1e-6, atol=1e-6)  # repeated pairs add up, as indexing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31])
def test_padded_slot_count_rounds_up_to_the_multiple(n):
    padded = padded_slot_count(n)
    assert padded >= max(n, 1) and padded % SLOT_MULTIPLE == 0 and padded - n < SLOT_MULTIPLE + (n == 0)


def test_deferred_checks_queue_value_checks_and_report_failure_as_a_flag():
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan"), 2.0])
    with deferred_checks() as checks:
        check_finite("y", good, "finite y")
        check_finite("x", bad, "finite x")  # queued: nothing raises inside the block
        check_range("z", torch.tensor([5.0]), 0, 3, "z in [0, 3)")
        assert len(checks.flags) == 3
    assert bool(checks.failure())
    with deferred_checks() as clean:
        check_finite("y", good, "finite y")
        check_range("z", torch.tensor([1.0]), 0, 3, "z in [0, 3)")
    assert not bool(clean.failure())
    with deferred_checks() as empty:
        pass
    assert not bool(empty.failure("cpu"))
    with pytest.raises(LossInputError, match="x has 1 non-finite values"):
        check_finite("x", bad, "finite x")  # outside the block the check raises at once, as before


def test_row_capacity_is_a_power_of_two_covering_the_padded_slots():
    for n in range(0, 600):
        cap = row_capacity(n)
        assert cap >= max(n, padded_slot_count(n)) and cap & (cap - 1) == 0 and cap >= MIN_ROW_CAPACITY
        assert cap == MIN_ROW_CAPACITY or cap < 2 * n


def _padded_rows(batch: dict, capacity: int, junk: float) -> dict:
    """The batch's rows followed by junk rows (what stale static buffers hold), up to `capacity` rows."""
    out = {}
    for k, v in batch.items():
        tail = torch.full((capacity - v.shape[0], *v.shape[1:]), junk).to(v.dtype)
        out[k] = torch.cat((v, tail))
    return out


@pytest.mark.parametrize("mode", MODES)
@given(case=loss_cases(), junk=st.sampled_from([float("nan"), -7.0, 3.0, 0.0]))
@settings(max_examples=15, deadline=None)
def test_padded_rows_change_no_check_and_no_slot(mode, case, junk):
    """The graphed path's batch buffers hold stale rows past the batch; with their count they change nothing."""
    feats, batch, seed, spread, _ = case
    _, fast = _criteria(mode)
    fast._fast = path = FastPath(fast.detection if mode != "detection" else fast, None if mode == "detection" else fast)
    preds = _head_outputs(feats, seed, spread)
    n = batch["batch_idx"].shape[0]
    status, slots = path._checked_slots(preds, batch, None, None)
    capacity = row_capacity(n)
    padded = _padded_rows(batch, capacity, junk)
    p_status, p_slots = path._checked_slots(preds, padded, torch.tensor(n), capacity)
    assert p_status.tolist() == status.tolist()
    b, k = preds["scores"].shape[0], slots[0].shape[1]
    for got, want in zip(p_slots[:3], slots[:3]):
        assert torch.equal(got[:b, :k], want[:b]) and not got[:b, k:].any()
    if mode != "detection":  # polygons of padding slots are never read: compared at real slots
        real = slots[2][:b]
        assert torch.equal(p_slots[3][0][:b, :k][real], slots[3][0][:b][real])
        assert torch.equal(p_slots[3][1][:b, :k], slots[3][1][:b])


@pytest.mark.parametrize("mode", MODES)
@given(case=loss_cases())
@settings(max_examples=10, deadline=None)
def test_graphed_host_path_equals_reference(mode, case):
    """The graphed path's host side (static buffers, padded rows, preloaded inputs) with the graphs themselves run
    eagerly (a CPU stand-in for capture and replay), over two batches of different sizes into the same buffers."""
    reference, fast = _criteria(mode)
    fast._fast = path = FastPath(fast.detection if mode != "detection" else fast, None if mode == "detection" else fast)
    path._graphed = lambda preds: True
    path.prep = lambda key, fn: fn()
    feats, batch, seed, spread, progress = case
    preds = _head_outputs(feats, seed, spread)
    for rows in (batch["batch_idx"].shape[0], 0):
        part = {k: v[:rows] for k, v in batch.items()}
        ref, got = _evaluate(reference, mode, preds, part, progress), _evaluate(fast, mode, preds, part, progress)
        torch.testing.assert_close(got[0], ref[0], rtol=TOL, atol=TOL)
        for name, g in ref[2].items():
            torch.testing.assert_close(got[2][name], g, rtol=TOL, atol=TOL * max(1.0, float(g.abs().max())))
    assert path._batch_buffers, "the graphed host path was not taken"


@pytest.mark.parametrize("loss_class", [DetectionLoss, PolygonLoss])
def test_default_takes_the_reference_path_on_the_cpu(loss_class):
    """cuda_graphs=None (the default) never builds the fast path for CPU predictions: the CPU path is the reference."""
    criterion = loss_class(NC, STRIDES, np=NP) if loss_class is PolygonLoss else loss_class(NC, STRIDES)
    assert criterion.cuda_graphs is None
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s)) for c, s in zip(CHANNELS, STRIDES)]
    batch = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]),
             "polygons": torch.rand(2, NP, 2) * 0.2 + 0.4}
    criterion(_head_outputs(feats, 0, 1.0), batch)
    assert criterion._fast is None


@pytest.mark.parametrize("value", [1, 0, "yes"])
@pytest.mark.parametrize("loss_class", [DetectionLoss, PolygonLoss])
def test_cuda_graphs_takes_only_a_bool_or_none(loss_class, value):
    with pytest.raises(TypeError, match=f"cuda_graphs is {value!r}; expected True, False or None"):
        loss_class(NC, STRIDES, cuda_graphs=value)


def test_graphed_core_runs_eagerly_off_cuda():
    calls = []

    def core(x):
        calls.append(1)
        return (x * 2).sum().reshape(1)

    graphed = GraphedCore(core)
    x = torch.ones(4, requires_grad=True)
    out = graphed(x)
    out.sum().backward()
    assert calls == [1] and float(out.detach()) == 8.0 and torch.equal(x.grad, torch.full((4,), 2.0))


# --------------------------------------------------------------------------------------------------- CUDA only
def _cuda_case() -> tuple[dict, dict]:
    """Head outputs (leaf tensors) and a 3-object batch without polygon_mask, on the GPU."""
    feats = [torch.randn(2, c, 128 // int(s), 128 // int(s)) for c, s in zip(CHANNELS, STRIDES)]
    preds = _head_outputs(feats, 0, 1.0)
    preds = {k: (v.detach().cuda().requires_grad_() if k != "feats" else [f.cuda() for f in v])
             for k, v in preds.items()}
    batch = {"batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2], [0.6, 0.4, 0.5, 0.5]]),
             "polygons": torch.rand(3, NP, 2) * 0.2 + 0.4}
    return preds, {k: v.cuda() for k, v in batch.items()}


def _replayed_equals_reference(reference, fast, mode: str, captured: bool) -> None:
    """Three fast calls (capture or its refusal, then replays) give the reference's loss and gradients."""
    preds, batch = _cuda_case()
    ref = _evaluate(reference, mode, preds, batch, 0.4)
    for _ in range(3):
        got = _evaluate(fast, mode, preds, batch, 0.4)
    assert (fast._fast.core.disabled_reason is None) == captured, fast._fast.core.disabled_reason
    torch.testing.assert_close(got[0], ref[0], rtol=TOL, atol=TOL)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=TOL, atol=TOL * float(g.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replay_matches_reference(mode):
    _replayed_equals_reference(*_criteria(mode), mode, captured=True)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_default_is_the_captured_fast_path(mode):
    """No flag: CUDA predictions take the fast path and its graphs are captured, with the reference's results."""
    reference, _ = _criteria(mode)
    default = DetectionLoss(NC, STRIDES) if mode == "detection" else PolygonLoss(NC, STRIDES, np=NP, mode=mode)
    _replayed_equals_reference(reference, default, mode, captured=True)
    assert default._fast.core._cache, "the default replayed no CUDA graph"


def _capturable_shape_loss(pred, target, pred_mask=None, target_mask=None):
    # No mask reaches it (the batch has no polygon_mask) and check_finite=False: mgiou then reads nothing on the host.
    return 2 * mgiou(pred, target, pred_mask, target_mask, check_finite=False)


def _syncing_shape_loss(pred, target, pred_mask=None, target_mask=None):
    """The same loss, scaled by a host-read 1.0: a sync, which CUDA-graph capture refuses."""
    return _capturable_shape_loss(pred, target, pred_mask, target_mask) * float(pred.new_ones(()))


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [True, None], ids=["explicit", "default"])
@pytest.mark.parametrize("shape_loss", [_capturable_shape_loss, _syncing_shape_loss], ids=["captured", "eager"])
@pytest.mark.parametrize("mode", [None, "hybrid"])
def test_cuda_user_vertex_loss_equals_the_reference_captured_or_eager(mode, shape_loss, cuda_graphs):
    """A vertex loss that syncs is not captured: True runs the fast core eagerly, the default the reference."""
    reference = PolygonLoss(NC, STRIDES, np=NP, mode=mode, vertex_loss=shape_loss, cuda_graphs=False)
    fast = PolygonLoss(NC, STRIDES, np=NP, mode=mode, vertex_loss=shape_loss, cuda_graphs=cuda_graphs)
    _replayed_equals_reference(reference, fast, "polygon", captured=shape_loss is _capturable_shape_loss)


@pytest.mark.cuda
def test_graphed_core_outputs_survive_later_calls_and_interleaved_backward():
    graphed = GraphedCore(lambda x: (x * x).sum().reshape(1))
    a = torch.full((8,), 2.0, device="cuda", requires_grad=True)
    b = torch.full((8,), 3.0, device="cuda", requires_grad=True)
    out_a = graphed(a)
    out_b = graphed(b)  # replays over the static buffers that out_a came from
    out_a.sum().backward()  # must use a's inputs, not b's
    out_b.sum().backward()
    assert float(out_a.detach()) == 32.0 and float(out_b.detach()) == 72.0
    assert torch.equal(a.grad, torch.full_like(a, 4.0)) and torch.equal(b.grad, torch.full_like(b, 6.0))


@pytest.mark.cuda
def test_graphed_core_falls_back_when_capture_fails():
    def syncing(x):
        return x * float(x.detach().sum())  # a host sync: not capturable

    graphed = GraphedCore(syncing)
    x = torch.ones(4, device="cuda", requires_grad=True)
    out = graphed(x)
    assert graphed.disabled_reason is not None and torch.equal(out, torch.full_like(x, 4.0))


@pytest.mark.cuda
def test_graphed_core_runs_eagerly_under_autocast():
    def core(x, w):
        return (x @ w).float().sum().reshape(1)  # under fp16 autocast the product overflows to inf

    graphed = GraphedCore(core)
    x = torch.full((16, 16), 300.0, device="cuda", requires_grad=True)
    w = torch.full((16, 16), 300.0, device="cuda")
    plain = graphed(x, w)
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = graphed(x, w)
    assert len(graphed._cache) == 1  # only the call outside autocast was captured
    assert torch.isfinite(plain).all() and torch.isinf(mixed).all()


@pytest.mark.cuda
@pytest.mark.parametrize("history", ["kept", "cleared"])
@pytest.mark.parametrize("mode", ["detection", "mgiou"])
def test_cuda_interleaved_calls_over_shared_buffers_give_each_its_own_gradients(mode, history):
    """Two forwards (different object counts over the same prediction buffers, batch buffers refilled in between),
    then both backwards in the order of the calls: each call gets the reference's gradients. History kept: both
    run the larger count's graph (the guess), the first's backward replays its forward from its snapshot; cleared:
    the first runs the smaller graph, the second that graph too (its guess, abandoned) and then the larger one."""
    reference, fast = _criteria(mode)
    preds, batch = _cuda_case()
    many = {k: v.repeat((9,) + (1,) * (v.ndim - 1)) for k, v in batch.items()}  # 27 objects, 18 in image 0
    for b in (batch, many):
        _evaluate(fast, mode, preds, b, 0.4)  # capture both
    expected = [_evaluate(reference, mode, preds, b, 0.4)[2] for b in (batch, many)]
    for v in preds.values():
        if isinstance(v, torch.Tensor):
            v.grad = None
    if history == "cleared":
        fast._fast._recent_slots.clear()
    first = fast(preds, batch)[0] if mode == "detection" else fast(preds, batch, 0.4)[0]
    second = fast(preds, many)[0] if mode == "detection" else fast(preds, many, 0.4)[0]
    for loss, want in zip((first, second), expected):
        grads = torch.autograd.grad(loss.sum(), [preds["boxes"], preds["scores"]])
        for got, ref in zip(grads, (want["boxes"], want["scores"])):
            torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL * float(ref.abs().max()))
    assert len(fast._fast.core._cache) == 2 and fast._fast.core.disabled_reason is None


@pytest.mark.cuda
@pytest.mark.parametrize("value", [float("nan"), -float("nan")], ids=["nan", "negative-nan"])
@pytest.mark.parametrize("key", ["scores", "boxes", "polygons"])
def test_cuda_core_queued_on_rejected_predictions_leaves_the_device_usable(key, value):
    """After a first call the core is queued before the checks are read: on NaN predictions the call raises the
    reference's error, and the next call (the same graphs) gives the reference's loss and gradients."""
    reference, fast = _criteria("mgiou")
    preds, batch = _cuda_case()
    expected = _evaluate(reference, "mgiou", preds, batch, 0.4)
    _evaluate(fast, "mgiou", preds, batch, 0.4)
    broken = dict(preds, **{key: preds[key].detach().clone().fill_(value).requires_grad_()})
    message = _raised(lambda: reference(broken, batch, 0.4))
    assert message is not None and _raised(lambda: fast(broken, batch, 0.4)) == message
    got = _evaluate(fast, "mgiou", preds, batch, 0.4)
    torch.cuda.synchronize()
    torch.testing.assert_close(got[0], expected[0], rtol=TOL, atol=TOL)
    for name, g in expected[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=TOL, atol=TOL * float(g.abs().max()))
