"""losses.PolygonLoss: detection terms untouched, one polygon term normalised once, per-image targets in own strides."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import losses.polygon
from heads import Polygon
from losses import DetectionGains, DetectionLoss, LossInputError, PolygonGains, PolygonLoss, mgiou, polygons_to_targets
from losses.polygon import polygon_vertex_loss

NC, NP, REG_MAX = 2, 6, 16
STRIDES = (8.0, 16.0, 32.0)
SIZE = 128  # px: A = 16*16 + 8*8 + 4*4 = 336 anchors
MODES = ("l2", "mgiou", "hybrid")


def anchors_of(size: int) -> int:
    return sum((size // int(s)) ** 2 for s in STRIDES)


def make_loss(mode="l2", **kwargs) -> PolygonLoss:
    return PolygonLoss(NC, STRIDES, np=NP, reg_max=REG_MAX, mode=mode, **kwargs)


def make_preds(batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    a = anchors_of(SIZE)
    return {
        "boxes": torch.randn(batch, 4 * REG_MAX, a, generator=gen),
        "scores": torch.randn(batch, NC, a, generator=gen),
        "polygons": torch.randn(batch, 2 * NP, a, generator=gen) * 0.5,
        "feats": [torch.zeros(batch, 1, SIZE // int(s), SIZE // int(s)) for s in STRIDES],
    }


def make_objects(counts: list[int], seed: int) -> dict:
    """counts[i] objects in image i: random boxes, each with a convex polygon of 3..NP+3 vertices inside it."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    centre = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
    wh = torch.rand(n, 2, generator=gen) * 0.35 + 0.1
    vertex_lists = []
    for k in range(n):
        v = int(torch.randint(3, NP + 4, (), generator=gen))
        angles = (torch.rand(v, generator=gen) + torch.arange(v)) * (2 * math.pi / v)  # one per sector: convex
        ring = torch.stack((angles.cos(), angles.sin()), 1) * wh[k] / 2
        vertex_lists.append(centre[k] + ring)
    polygons, mask = polygons_to_targets(vertex_lists, NP)
    return {
        "batch_idx": torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.float32),
        "cls": torch.randint(0, NC, (n, 1), generator=gen).float(),
        "bboxes": torch.cat((centre, wh), 1),
        "polygons": polygons,
        "polygon_mask": mask,
    }


def concat_batches(*parts: dict) -> dict:
    """Objects of several batches of one image each, as images 0, 1, ... of one batch."""
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "batch_idx"}
    out["batch_idx"] = torch.cat([torch.full_like(p["batch_idx"], i) for i, p in enumerate(parts)])
    return out


def concat_preds(*parts: dict) -> dict:
    out = {k: torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "polygons")}
    out["feats"] = [torch.cat(fs) for fs in zip(*(p["feats"] for p in parts))]
    return out


def unnormalised(terms) -> torch.Tensor:
    return (terms.per_anchor * terms.weight).sum()


seeds = st.integers(0, 2**20)
object_counts = st.lists(st.integers(0, 4), min_size=1, max_size=3)


@given(object_counts, seeds, st.sampled_from(MODES))
def test_detection_items_identical_to_detection_loss(counts, seed, mode):
    preds, batch = make_preds(len(counts), seed), make_objects(counts, seed)
    gains = PolygonGains(box=3.0, polygon=5.0, cls=0.7, dfl=2.0)
    vector, items = make_loss(mode, gains=gains)(preds, batch, progress=0.5)
    det_vector, det_items = DetectionLoss(NC, STRIDES, REG_MAX, gains=DetectionGains(3.0, 0.7, 2.0))(preds, batch)
    for name in ("box_loss", "cls_loss", "dfl_loss"):
        assert torch.equal(items[name], det_items[name]), name
    assert torch.equal(vector[[0, 2, 3]], det_vector)
    assert list(items) == ["box_loss", "polygon_loss", "cls_loss", "dfl_loss"]
    assert torch.equal(vector, torch.stack(list(items.values())) * len(counts))


@given(st.integers(4, 6), seeds, st.integers(2, 3), st.sampled_from(MODES))
def test_items_unchanged_when_one_image_is_replicated(count, seed, k, mode):
    # R4: per-image polygon losses accumulated (not averaged) grow with the batch; the items must not. Exactly so
    # when the image's target-score sum T is >= 1: every term divides by max(1, k*T) (Ultralytics' normaliser).
    preds, batch = make_preds(1, seed), make_objects([count], seed)
    assume(float(make_loss(mode).terms(preds, batch).detection.target_scores.sum()) >= 1)
    _, one = make_loss(mode)(preds, batch, progress=0.5)
    _, many = make_loss(mode)(concat_preds(*[preds] * k), concat_batches(*[batch] * k), progress=0.5)
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@given(st.integers(0, 4), st.integers(0, 4), seeds, st.sampled_from(MODES))
def test_polygon_sums_decompose_over_images(count_a, count_b, seed, mode):
    # With predictions fixed, each image's positives, targets and weighted losses depend on that image alone: the
    # un-normalised polygon sum of [A, B] is the sum of those of [A] and [B], and so is the normaliser. Hence
    # polygon_loss([A, B]) = (S_A + S_B) / max(1, T_A + T_B) * gain, for any T_A, T_B.
    loss = make_loss(mode)
    pa, pb = make_preds(1, seed), make_preds(1, seed + 1)
    ba, bb = make_objects([count_a], seed), make_objects([count_b], seed + 1)
    ta, tb = loss.terms(pa, ba, 0.5), loss.terms(pb, bb, 0.5)
    tab = loss.terms(concat_preds(pa, pb), concat_batches(ba, bb), 0.5)
    torch.testing.assert_close(tab.per_anchor, torch.cat((ta.per_anchor, tb.per_anchor)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unnormalised(tab), unnormalised(ta) + unnormalised(tb), rtol=1e-5, atol=1e-6)
    t_sum = lambda t: t.detection.target_scores.sum()  # noqa: E731
    torch.testing.assert_close(t_sum(tab), t_sum(ta) + t_sum(tb), rtol=1e-5, atol=1e-6)
    expected = (unnormalised(ta) + unnormalised(tb)) / (t_sum(ta) + t_sum(tb)).clamp(min=1) * loss.gains.polygon
    torch.testing.assert_close(tab.vector[1], expected, rtol=1e-5, atol=1e-6)


def _same_boxes_other_polygons(batch: dict, seed: int) -> dict:
    """Image B: A's boxes and classes with other polygons (reversed, rotated start, vertices pulled towards the
    centre): the assignment, hence the normaliser, is identical, only the polygon targets differ."""
    gen = torch.Generator().manual_seed(seed)
    other = dict(batch)
    shrink = torch.rand(batch["polygons"].shape[:2] + (1,), generator=gen) * 0.5 + 0.3
    centre = batch["bboxes"][:, None, :2]
    other["polygons"] = (centre + (batch["polygons"] - centre) * shrink).flip(1)
    other["polygon_mask"] = batch["polygon_mask"].flip(1)
    return other


def _per_image_mean(mode: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(polygon item of [A, B], mean of the items of [A] and [B], T_A = T_B)."""
    preds = make_preds(1, seed)
    batch_a = make_objects([count], seed)
    batch_b = _same_boxes_other_polygons(batch_a, seed)
    loss = make_loss(mode)
    item = lambda p, b: loss(p, b, progress=0.5)[1]["polygon_loss"]  # noqa: E731
    both = item(concat_preds(preds, preds), concat_batches(batch_a, batch_b))
    t = float(loss.terms(preds, batch_a).detection.target_scores.sum())
    return both, (item(preds, batch_a) + item(preds, batch_b)) / 2, t


@given(st.integers(4, 6), seeds, st.sampled_from(MODES))
def test_polygon_item_of_two_images_is_mean_of_each_alone_with_equal_normaliser(count, seed, mode):
    # R5: with equal target-score sums (same boxes and predictions), the polygon item of [A, B] is the mean of the
    # items of [A] and [B]. Replicating one image (R4's property) cannot catch R5; this can (see the mutant below).
    both, mean, t = _per_image_mean(mode, count, seed)
    # Every term divides by max(1, T): the mean property needs T_A = T_B >= 1 (below 1, [A, B] divides by 2T and
    # each alone by 1). Equal T comes from equal boxes and predictions.
    assume(t >= 1)
    torch.testing.assert_close(both, mean, rtol=1e-5, atol=1e-6)


def _flat_index_targets(polygons, polygon_mask, gt_rows, target_gt_idx, fg_mask, stride_tensor):
    """The R5 bug: the assigner's per-image slot index used as a row of the flat batch-wide list."""
    image, anchor = fg_mask.nonzero(as_tuple=True)
    rows = target_gt_idx[image, anchor]
    stride = stride_tensor.reshape(-1)[anchor]
    return polygons[rows] / stride[:, None, None], polygon_mask[rows], rows


@pytest.mark.parametrize("mode", MODES)
def test_per_image_mean_property_fails_on_the_r5_mutant(mode, monkeypatch):
    count, seed = 5, 11
    both, mean, t = _per_image_mean(mode, count, seed)
    assert t >= 1
    torch.testing.assert_close(both, mean, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(losses.polygon, "assigned_polygon_targets", _flat_index_targets)
    both, mean, _ = _per_image_mean(mode, count, seed)
    assert abs(float(both - mean)) > 1e-3 * float(mean)


@given(object_counts, seeds, st.randoms(use_true_random=False), st.sampled_from(MODES))
def test_invariant_to_object_order(counts, seed, rng, mode):
    preds, batch = make_preds(len(counts), seed), make_objects(counts, seed)
    order = list(range(int(sum(counts))))
    rng.shuffle(order)  # interleaves images too: rows need not be grouped by image
    shuffled = {k: v[order] for k, v in batch.items()}
    _, a = make_loss(mode)(preds, batch, progress=0.5)
    _, b = make_loss(mode)(preds, shuffled, progress=0.5)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@given(st.integers(1, 3), seeds, st.sampled_from(MODES))
def test_all_background_batch_box_and_polygon_terms_exactly_zero(batch_size, seed, mode):
    preds = make_preds(batch_size, seed)
    for value in ("boxes", "scores", "polygons"):
        preds[value].requires_grad_(True)
    vector, items = make_loss(mode)(preds, make_objects([0] * batch_size, seed), progress=0.5)
    assert items["box_loss"] == 0.0 and items["polygon_loss"] == 0.0 and items["dfl_loss"] == 0.0
    assert bool(torch.isfinite(vector).all()) and items["cls_loss"] > 0
    vector.sum().backward()
    assert all(bool(torch.isfinite(preds[k].grad).all()) for k in ("boxes", "scores", "polygons"))


def _level_stride(anchor: int, size: int = SIZE) -> float:
    """Stride of anchor index `anchor`, from the level sizes alone (independent of the loss's stride tensor)."""
    for s in STRIDES:
        cells = (size // int(s)) ** 2
        if anchor < cells:
            return s
        anchor -= cells
    raise IndexError(anchor)


@given(object_counts, seeds)
def test_target_of_each_positive_is_its_objects_polygon_over_its_own_stride(counts, seed):
    preds, batch = make_preds(len(counts), seed), make_objects(counts, seed)
    terms = make_loss("l2").terms(preds, batch)
    det = terms.detection
    image, anchor = det.fg_mask.nonzero(as_tuple=True)
    centre, wh = batch["bboxes"][:, :2], batch["bboxes"][:, 2:]
    xyxy = torch.cat((centre - wh / 2, centre + wh / 2), 1)
    for k, (i, j) in enumerate(zip(image.tolist(), anchor.tolist())):
        # Identify the matched object by its box (boxes are distinct), not by any index the loss computed.
        same_image = batch["batch_idx"] == i
        match = ((xyxy * SIZE - det.target_bboxes[i, j]).abs().amax(1) < 1e-3) & same_image
        assert int(match.sum()) == 1
        row = int(match.nonzero())
        expected = batch["polygons"][row] * SIZE / _level_stride(j)
        torch.testing.assert_close(terms.target[k], expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(terms.mask[k], batch["polygon_mask"][row]) and int(terms.rows[k]) == row


def small_head(seed: int = 0) -> Polygon:
    torch.manual_seed(seed)
    head = Polygon(nc=NC, np=NP, reg_max=REG_MAX, ch=(8, 8, 8))
    head.stride = torch.tensor(STRIDES)
    head.bias_init()
    return head


def small_feats(head: Polygon, seed: int, size: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, size // int(s), size // int(s), generator=gen) for c, s in zip(head.ch, STRIDES)]


@given(st.integers(0, 100))
def test_loss_decodes_vertices_exactly_as_inference(seed):
    head = small_head(seed).eval()
    with torch.no_grad():
        y, preds = head(small_feats(head, seed))
    terms = PolygonLoss.for_head(head).terms(preds, make_objects([3, 2], seed))
    image, anchor = terms.detection.fg_mask.nonzero(as_tuple=True)
    assert image.numel() > 0
    inference = y[image, 4 + NC :, anchor].reshape(-1, NP, 2)
    stride = torch.tensor([_level_stride(j, size=64) for j in anchor.tolist()])
    assert torch.equal(terms.pred * stride[:, None, None], inference)


@given(object_counts, seeds, st.sampled_from(MODES), st.sampled_from([1e6, -3.0, float("nan"), float("inf")]))
def test_padded_vertices_change_nothing(counts, seed, mode, junk):
    preds, batch = make_preds(len(counts), seed), make_objects(counts, seed)
    other = dict(batch, polygons=torch.where(batch["polygon_mask"][..., None], batch["polygons"], junk))
    results = []
    for b in (batch, other):
        raw = preds["polygons"].clone().requires_grad_(True)
        vector, _ = make_loss(mode)(dict(preds, polygons=raw), b, progress=0.5)
        vector.sum().backward()
        results.append((vector.detach(), raw.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@given(object_counts, seeds, st.floats(0.0, 1.0))
def test_hybrid_is_a_pure_blend_of_l2_and_mgiou(counts, seed, progress):
    preds, batch = make_preds(len(counts), seed), make_objects(counts, seed)
    hybrid = make_loss("hybrid")
    first = hybrid(preds, batch, progress=progress)[1]["polygon_loss"]
    hybrid(make_preds(2, seed + 1), make_objects([2, 1], seed + 1), progress=1.0 - progress)  # no state carried
    assert torch.equal(hybrid(preds, batch, progress=progress)[1]["polygon_loss"], first)
    l2 = make_loss("l2")(preds, batch)[1]["polygon_loss"]
    mg = make_loss("mgiou")(preds, batch)[1]["polygon_loss"]
    torch.testing.assert_close(first, (1 - progress) * l2 + progress * mg, rtol=1e-5, atol=1e-6)
    assert torch.equal(hybrid(preds, batch, progress=0.0)[1]["polygon_loss"], l2)


# --------------------------------------------------------------------------- the per-polygon vertex loss itself
@st.composite
def vertex_pairs(draw):
    gen = torch.Generator().manual_seed(draw(seeds))
    p, v = draw(st.integers(1, 5)), draw(st.integers(3, 8))
    pred, target = torch.randn(p, v, 2, generator=gen), torch.randn(p, v, 2, generator=gen)
    mask = torch.rand(p, v, generator=gen) > 0.4
    mask[:, 0] = True
    area = torch.rand(p, generator=gen) + 0.1
    return pred, target, mask, area


@given(vertex_pairs(), st.floats(0.1, 100.0))
def test_l2_is_mean_squared_vertex_error_over_area_and_scale_free(pair, scale):
    pred, target, mask, area = pair
    loss = polygon_vertex_loss(pred, target, mask, area, "l2")
    # One real vertex moved by e, the others exact: |e|^2 / (real vertices * area).
    exact = polygon_vertex_loss(target, target, mask, area, "l2")
    assert torch.equal(exact, torch.zeros_like(exact))
    moved = target.clone()
    moved[:, 0] += pred[:, 0]
    single = polygon_vertex_loss(moved, target, mask, area, "l2")
    torch.testing.assert_close(single, pred[:, 0].pow(2).sum(-1) / (mask.sum(-1) * area), rtol=1e-5, atol=1e-7)
    scaled = polygon_vertex_loss(pred * scale, target * scale, mask, area * scale**2, "l2")
    torch.testing.assert_close(scaled, loss, rtol=1e-4, atol=1e-6)
    # A masked vertex is excluded, whatever the prediction there.
    junk = torch.where(mask[..., None], pred, torch.full_like(pred, 1e3))
    assert torch.equal(polygon_vertex_loss(junk, target, mask, area, "l2"), loss)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vertex_loss_finite_with_gradients_on_degenerate_targets(mode, dtype):
    target = torch.tensor([[[1.0, 1.0]] * 4, [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [[0.0, 0.0]] * 4])
    pred = (target + 0.25 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    pred.requires_grad_(True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss = polygon_vertex_loss(pred, target.to(dtype), mask, torch.full((3,), 0.5), mode, 0.5)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss).all()) and bool(torch.isfinite(pred.grad).all())


def test_polygon_gradient_at_head_init_is_finite_and_nonzero():
    head = small_head()
    feats = small_feats(head, 0)
    for mode in MODES:
        head.zero_grad()
        vector, items = PolygonLoss.for_head(head, mode=mode)(head(feats), make_objects([3, 2], 0), progress=0.5)
        vector[1].backward()
        grad = head.cv4[0][-1].weight.grad
        assert items["polygon_loss"] > 0 and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, mode


# ------------------------------------------------------------------------------------------------- bad inputs
def _valid() -> tuple[dict, dict]:
    return make_preds(2, 0), make_objects([2, 1], 0)


def _nan_at(t: torch.Tensor, value=float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


BAD_INPUTS = {
    "preds has no 'polygons'": lambda p, b: ({k: v for k, v in p.items() if k != "polygons"}, b),
    r"preds\['polygons'\] has shape \(2, 10, 336\)": lambda p, b: (dict(p, polygons=p["polygons"][:, :10]), b),
    r"preds\['polygons'\] has 1 non-finite": lambda p, b: (dict(p, polygons=_nan_at(p["polygons"])), b),
    r"preds\['polygons'\] has 1 non-finite values .*; expected finite": lambda p, b: (
        dict(p, polygons=_nan_at(p["polygons"], float("inf"))), b),
    r"preds\['polygons'\] has dtype torch.int64": lambda p, b: (dict(p, polygons=p["polygons"].long()), b),
    "batch has no 'polygons'": lambda p, b: (p, {k: v for k, v in b.items() if k != "polygons"}),
    r"batch\['polygons'\] has shape \(3, 5, 2\)": lambda p, b: (p, dict(b, polygons=b["polygons"][:, :5])),
    r"batch\['polygons'\] has shape \(2, 6, 2\)": lambda p, b: (p, dict(b, polygons=b["polygons"][:2])),
    r"batch\['polygons'\] \(real vertices\) has 1 non-finite": lambda p, b: (
        p, dict(b, polygons=_nan_at(b["polygons"]))),
    r"batch\['polygon_mask'\] has shape \(3, 5\)": lambda p, b: (p, dict(b, polygon_mask=b["polygon_mask"][:, :5])),
    r"batch\['polygon_mask'\] has dtype torch.float32": lambda p, b: (
        p, dict(b, polygon_mask=b["polygon_mask"].float())),
    r"batch\['polygon_mask'\] has no real vertex in rows \[1\]": lambda p, b: (
        p, dict(b, polygon_mask=torch.cat((b["polygon_mask"][:1], torch.zeros(1, NP, dtype=torch.bool),
                                           b["polygon_mask"][2:])))),
}


@pytest.mark.parametrize("match", list(BAD_INPUTS))
def test_bad_polygon_inputs_raise_loss_input_error(match):
    preds, batch = BAD_INPUTS[match](*_valid())
    with pytest.raises(LossInputError, match=match):
        make_loss("mgiou")(preds, batch)


@pytest.mark.parametrize("progress", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_progress_outside_unit_interval_raises(progress):
    with pytest.raises(LossInputError, match="progress"):
        make_loss("hybrid")(*_valid(), progress=progress)


def test_raw_offset_beyond_the_bound_at_a_positive_raises_instead_of_a_quiet_inf():
    preds, batch = _valid()
    terms = make_loss().terms(preds, batch)
    image, anchor = terms.detection.fg_mask.nonzero(as_tuple=True)
    huge = preds["polygons"].clone()
    huge[image[0], 0, anchor[0]] = 3e38  # finite raw whose decoded vertex overflows float32
    with pytest.raises(LossInputError, match=r"preds\['polygons'\] has 1 values outside \[-1e\+06, 1e\+06\]"):
        make_loss()(dict(preds, polygons=huge), batch)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(np=2), ValueError, "np is 2; expected an int >= 3"),
        (dict(np=True), ValueError, r"np is True; expected an int >= 3"),
        (dict(mode="giou"), ValueError, "mode is 'giou'; expected one of"),
        (dict(gains=DetectionGains()), TypeError, "gains is a DetectionGains; expected a PolygonGains"),
    ],
)
def test_bad_configuration_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        PolygonLoss(NC, STRIDES, **kwargs)


def test_for_head_reads_nc_np_reg_max_and_strides():
    head = Polygon(nc=3, np=5, reg_max=8, ch=(8, 16))
    head.stride = torch.tensor([8.0, 16.0])
    loss = PolygonLoss.for_head(head, mode="mgiou")
    assert (loss.np, loss.term, loss.vertex_loss, loss.detection.nc, loss.detection.reg_max) == (5, "shape", mgiou, 3, 8)
    assert loss.detection.strides == (8.0, 16.0)
    with pytest.raises(ValueError, match="stride"):
        PolygonLoss.for_head(Polygon(nc=1, np=4, ch=(8,)))
