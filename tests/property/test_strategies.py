"""headguard.strategies produce what they promise, and reject bad arguments with messages naming them."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import find as _find
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import heads
import losses
from headguard import strategies as hs
from headguard._polygon_iou import polygon_iou
from headguard.subject import HeadSpec, build_subject

CHANNELS, STRIDES = (16, 32, 64), (8.0, 16.0, 32.0)
# Existence queries: the first match is enough; shrinking tensors-valued examples would cost seconds each.
_FIND = settings(max_examples=500, database=None, phases=[Phase.generate], derandomize=True)


def find(strategy, condition):
    return _find(strategy, condition, settings=_FIND)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only contend (10x slower measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def polygon_subject():
    return build_subject(HeadSpec(heads.Polygon), "Polygon")


@given(hs.feature_maps(CHANNELS, STRIDES, min_batch=2, max_batch=3, magnitudes=st.sampled_from([0.0, 1.0, 1e4])))
def test_feature_maps_shapes_and_layouts(maps):
    r = maps.recipe
    assert len(maps) == len(CHANNELS)
    assert 2 <= r.batch <= 3
    for m, c, s in zip(maps, CHANNELS, STRIDES):
        assert m.shape == (r.batch, c, math.ceil(r.image_size[0] / s), math.ceil(r.image_size[1] / s))
        assert m.dtype == torch.float32
        # magnitude * base, where |base| <= 1 for constant/signs fills.
        if r.fill != "normal":
            assert float(m.abs().max()) <= r.magnitude * (1 + 1e-6)
        if r.fill == "constant":
            assert bool((m == m.flatten()[0]).all())
        if r.layout == "channels_last" and m.shape[1] > 1 and m.shape[2] * m.shape[3] > 1:
            assert m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous()
        if r.layout == "non_contiguous" and m.shape[2] > 1 and m.shape[3] > 1:
            assert not m.is_contiguous()
        if r.layout == "contiguous":
            assert m.is_contiguous()


def test_feature_maps_reach_odd_sizes_and_extremes():
    maps = find(
        hs.feature_maps(CHANNELS, STRIDES),
        lambda m: m.recipe.image_size[0] % 2 == 1 and m.recipe.layout == "channels_last",
    )
    assert maps[0].shape[2] == math.ceil(maps.recipe.image_size[0] / 8)
    assert find(hs.magnitudes(max_value=None), lambda v: v > 1e37) <= torch.finfo(torch.float32).max
    assert find(hs.magnitudes(), lambda v: 0 < v < 1e-20) == 1e-30
    assert find(hs.magnitudes(dtype=torch.float16, max_value=None), lambda v: v > 1e4) <= 65504


@given(hs.targets(3, batch_size=2, num_vertices=6, min_objects=1, max_objects=5))
def test_targets_are_well_formed(batch):
    n = batch["batch_idx"].shape[0]
    assert 1 <= n <= 5
    assert batch["cls"].shape == (n, 1) and batch["bboxes"].shape == (n, 4)
    assert batch["polygons"].shape == (n, 6, 2) and batch["polygon_mask"].shape == (n, 6)
    assert bool(((batch["batch_idx"] >= 0) & (batch["batch_idx"] < 2)).all())
    assert bool(((batch["cls"] >= 0) & (batch["cls"] < 3)).all())
    cx, cy, w, h = batch["bboxes"].unbind(-1)
    eps = 1e-6
    assert bool(((w >= 0) & (h >= 0)).all())
    assert bool(((cx - w / 2 >= -eps) & (cx + w / 2 <= 1 + eps) & (cy - h / 2 >= -eps) & (cy + h / 2 <= 1 + eps)).all())
    assert bool((batch["polygon_mask"].sum(-1) >= 3).all())
    # each polygon lies inside its own box
    lo = (batch["bboxes"][:, :2] - batch["bboxes"][:, 2:] / 2).unsqueeze(1)
    hi = (batch["bboxes"][:, :2] + batch["bboxes"][:, 2:] / 2).unsqueeze(1)
    assert bool(((batch["polygons"] >= lo - eps) & (batch["polygons"] <= hi + eps)).all())


def test_targets_cover_the_promised_families():
    empty = find(hs.targets(2), lambda b: b["batch_idx"].numel() == 0)
    assert empty["bboxes"].shape == (0, 4)
    zero_width = find(hs.targets(2, min_objects=1), lambda b: bool((b["bboxes"][:, 2] == 0).any()))
    assert zero_width["bboxes"].shape[0] >= 1
    whole = torch.tensor([0.5, 0.5, 1.0, 1.0])
    covering = find(hs.targets(2, min_objects=1), lambda b: bool((b["bboxes"] == whole).all(-1).any()))
    assert covering is not None
    dup = find(
        hs.targets(2, min_objects=2), lambda b: len({tuple(r) for r in b["bboxes"].tolist()}) < b["bboxes"].shape[0]
    )
    assert dup["bboxes"].shape[0] >= 2
    padded = find(hs.targets(2, num_vertices=8, min_objects=1), lambda b: bool((~b["polygon_mask"]).any()))
    assert bool((padded["polygon_mask"].sum(-1) >= 3).all())
    degenerate = find(hs.targets(2, num_vertices=5, min_objects=1, polygon_kinds=("all_equal",)), lambda b: True)
    assert bool((degenerate["polygons"] == degenerate["polygons"][:, :1]).all())


def _signed_area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return float((x * y.roll(-1) - x.roll(-1) * y).sum() / 2)


def test_targets_draw_both_orientations():
    kinds = dict(num_vertices=5, min_objects=1, max_objects=1, box_kinds=("normal",), polygon_kinds=("convex",))
    cw = find(hs.targets(1, **kinds), lambda b: _signed_area(b["polygons"][0]) < -1e-4)
    ccw = find(hs.targets(1, **kinds), lambda b: _signed_area(b["polygons"][0]) > 1e-4)
    assert _signed_area(cw["polygons"][0]) < 0 < _signed_area(ccw["polygons"][0])


@settings(max_examples=10)
@given(data=st.data())
def test_targets_are_valid_input_for_the_reference_loss(polygon_subject, data):
    """What `targets` promises as VALID: the reference loss accepts it and returns a finite value."""
    head = polygon_subject.build_head()
    bound = hs.from_head(polygon_subject)
    maps = data.draw(bound.feature_maps(max_batch=2, magnitudes=st.just(1.0)), label="maps")
    batch = data.draw(bound.targets(batch_size=maps[0].shape[0], max_objects=5), label="batch")
    vector, _ = polygon_subject.build_loss(head)(head(list(maps)), batch)
    assert bool(torch.isfinite(vector).all())


@settings(max_examples=10)
@given(data=st.data())
def test_out_of_image_boxes_are_valid_for_the_detection_loss(data):
    subject = build_subject(HeadSpec(heads.Detect), "Detect")
    head = subject.build_head()
    maps = data.draw(hs.from_head(subject).feature_maps(max_batch=1, magnitudes=st.just(1.0)))
    batch = data.draw(hs.targets(2, min_objects=1, box_kinds=("out_of_image", "normal")))
    vector, _ = subject.build_loss(head)(head(list(maps)), batch)
    assert bool(torch.isfinite(vector).all())


@settings(max_examples=10)
@given(pair=hs.invalid_targets(2, batch_size=2, num_vertices=8))
def test_invalid_targets_are_rejected_by_the_reference_loss(polygon_subject, pair):
    kind, batch = pair
    head = polygon_subject.build_head()
    preds = head([torch.randn(s) for s in polygon_subject.feature_shapes((64, 64), 2)])
    with pytest.raises(losses.LossInputError, match=r"batch\['(bboxes|cls|batch_idx)'\]"):
        polygon_subject.build_loss(head)(preds, batch)


@given(init=hs.initialisations())
def test_initialisations_scale_and_perturb_weights_and_keep_biases(polygon_subject, init):
    head = polygon_subject.build_head()
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    init(head)
    for name, p in head.named_parameters():
        module = head.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, torch.nn.Conv2d) and name.endswith("weight") and p.requires_grad:
            scaled = before[name] * init.scale
            if init.noise == 0 or p.numel() == 1:
                torch.testing.assert_close(p, scaled)
            else:  # the noise is `noise` times the shipped weight's own spread, per tensor
                ratio = float((p.detach() - scaled).double().std() / before[name].double().std())
                assert 0.5 * init.noise < ratio < 1.5 * init.noise, (name, ratio)
        else:
            assert torch.equal(p, before[name]), name


def test_the_shipped_initialisation_changes_nothing_and_comes_first(polygon_subject):
    head = polygon_subject.build_head()
    before = [p.clone() for p in head.parameters()]
    assert hs.SHIPPED(head) is head and all(torch.equal(a, b) for a, b in zip(head.parameters(), before))
    assert repr(hs.SHIPPED) == "Initialisation(as shipped)"
    assert _find(hs.initialisations(), lambda init: True) == hs.SHIPPED  # what a failure shrinks towards


def test_dtypes_offer_fp16_on_cuda_only():
    cpu = {d.name for d in _all(hs.dtypes(cuda=False))}
    cuda = {d.name for d in _all(hs.dtypes(cuda=True))}
    assert cpu == {"float32", "bfloat16-autocast-cpu"}
    assert cuda == cpu | {"float16-autocast-cuda"}
    assert all(d.device == "cuda" for d in _all(hs.dtypes(cuda=True)) if d.autocast_dtype == torch.float16)


def _all(strategy):
    seen = set()

    @settings(max_examples=50, database=None)
    @given(strategy)
    def collect(value):
        seen.add(value)

    collect()
    return seen


def test_from_head_matches_from_subject(polygon_subject):
    from_module = hs.from_head(polygon_subject.build_head())
    from_subject = hs.from_head(polygon_subject)
    assert from_module == from_subject == hs.HeadStrategies(CHANNELS, STRIDES, 2, 8)


@given(pair=hs.from_head(build_subject(HeadSpec(heads.Detect), "Detect")).inputs())
def test_inputs_pair_maps_with_targets_of_the_same_batch(pair):
    maps, batch = pair
    assert "polygons" not in batch
    assert bool((batch["batch_idx"] < maps[0].shape[0]).all())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hs.targets("80"), "Expected int for nc, got nc='80' (type=str)"),
        (lambda: hs.targets(2, batch_size=True), "Expected int for batch_size, got batch_size=True (type=bool)"),
        (
            lambda: hs.targets(2, min_objects=3, max_objects=1),
            "Expected min_objects <= max_objects, got min_objects=3 and max_objects=1",
        ),
        (lambda: hs.targets(2, num_vertices=2), "Expected num_vertices == 0 (no polygons) or >= 3, got num_vertices=2"),
        (lambda: hs.targets(2, box_kinds=("round",)), "Expected a non-empty subset of"),
        (lambda: hs.feature_maps((16, 32), STRIDES), "Expected one stride per level"),
        (lambda: hs.feature_maps((16.0,), (8,)), "Expected int for channels[0], got channels[0]=16.0 (type=float)"),
        (lambda: hs.feature_maps(CHANNELS, STRIDES, min_batch=0), "Expected min_batch >= 1, got min_batch=0"),
        (lambda: hs.feature_maps(CHANNELS, STRIDES, min_batch=4, max_batch=2), "Expected min_batch <= max_batch"),
        (lambda: hs.feature_maps(CHANNELS, STRIDES, dtype=torch.int32), "Expected a floating torch.dtype for dtype"),
        (lambda: hs.feature_maps(CHANNELS, STRIDES, image_sizes=(64, 64)), "Expected a SearchStrategy for image_sizes"),
        (lambda: hs.feature_maps(CHANNELS, STRIDES, layouts=("nchw",)), "Expected a non-empty subset of"),
        (lambda: hs.magnitudes(max_value=-1.0), "Expected a finite max_value > 0, got max_value=-1.0"),
        (lambda: hs.image_sizes(min_size=90, max_size=10), "Expected min_size <= max_size"),
        (lambda: hs.initialisations(scales=(0.0,)), "Expected finite scales > 0, got scales[0]=0.0"),
        (lambda: hs.from_head("heads:Detect"), "Expected an nn.Module or a Subject for head_or_subject"),
    ],
)
def test_bad_arguments_raise_invalid_argument(call, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        call()


# ------------------------------------------------------------------------------------------------------- polygons
def _cross(polygon: torch.Tensor) -> torch.Tensor:
    """z of edge i x edge i + 1, for every vertex."""
    e = polygon.roll(-1, 0) - polygon
    f = e.roll(-1, 0)
    return e[:, 0] * f[:, 1] - e[:, 1] * f[:, 0]


def _distinct(polygon: torch.Tensor) -> int:
    return len({tuple(v) for v in polygon.tolist()})


FAMILY_PROPERTIES = {
    "convex": lambda p: bool((_cross(p) > 0).all() or (_cross(p) < 0).all()),
    "huge": lambda p: float(p.abs().max()) == pytest.approx(1e8) and bool((_cross(p) > 0).all() or
                                                                           (_cross(p) < 0).all()),
    "tiny": lambda p: float(p.abs().max()) == pytest.approx(1e-6),
    "point": lambda p: _distinct(p) == 1,
    "segment": lambda p: _distinct(p) == 2,
    "collinear": lambda p: _distinct(p) == len(p) and float(_cross(p).abs().max()) <= 1e-9 * float(p.abs().max()) ** 2,
    "repeated_vertex": lambda p: bool((p == p.roll(-1, 0)).all(dim=1).any()) and _distinct(p) < len(p),
    "zero_area": lambda p: abs(_signed_area(p)) <= 1e-9 * float(p.abs().max()) ** 2,
}


@pytest.mark.parametrize("family", hs.POLYGON_FAMILIES)
@given(data=st.data())
def test_polygons_of_each_family_are_what_they_promise(family, data):
    polygon = data.draw(hs.polygons(families=(family,), min_vertices=4, max_vertices=9))
    assert polygon.dtype == torch.float64 and polygon.shape[1] == 2 and 4 <= len(polygon) <= 9
    assert bool(torch.isfinite(polygon).all())
    assert FAMILY_PROPERTIES[family](polygon), polygon


def test_zero_area_polygons_span_a_plane_and_convex_ones_take_both_orientations():
    spread = find(hs.polygons(families=("zero_area",), min_vertices=6, max_vertices=6),
                  lambda p: abs(float(_cross(p).abs().max())) > 1e-3)
    assert abs(_signed_area(spread)) <= 1e-9
    assert find(hs.polygons(families=("convex",)), lambda p: _signed_area(p) < 0) is not None
    assert find(hs.polygons(families=("convex",)), lambda p: _signed_area(p) > 0) is not None


@given(hs.polygons(dtype=torch.float16))
def test_polygons_in_float16_are_representable(polygon):
    assert polygon.dtype == torch.float16 and bool(torch.isfinite(polygon).all())
    assert float(polygon.abs().max()) <= torch.finfo(torch.float16).max / 4


@given(hs.polygon_pairs(min_vertices=3, max_vertices=5))
def test_polygon_pairs_share_a_vertex_count(pair):
    pred, target = pair
    assert pred.shape == target.shape and 3 <= len(pred) <= 5
    assert "PolygonPair(pred=[[" in repr(pair)


@given(hs.polygon_pairs(convex=True, relations=("near",), families=("convex",)))
def test_near_convex_pairs_overlap(pair):
    assert polygon_iou(pair.pred.numpy(), pair.target.numpy()) > 0


def test_convex_keeps_only_strictly_convex_families():
    assert find(hs.polygon_pairs(convex=True), lambda pair: True) is not None
    families = {f for f in hs.POLYGON_FAMILIES if f not in hs.CONVEX_FAMILIES}
    with pytest.raises(InvalidArgument, match="with convex=True"):
        hs.polygons(convex=True, families=tuple(families))


def test_polygon_samples_rebuild_the_same_pairs_from_their_seed():
    sample = find(hs.polygon_samples(size=6, min_vertices=4, max_vertices=5), lambda s: True)
    first, again = sample.pairs(), hs.PolygonSample(sample.seed, 6, 4, 5).pairs()
    assert len(first) == 6 and all(4 <= len(p) <= 5 and p.shape == t.shape for p, t in first)
    assert all(torch.equal(a, b) for pa, pb in zip(first, again) for a, b in zip(pa, pb))
    assert find(hs.polygon_samples(seeds=st.just(7)), lambda s: True).seed == 7


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hs.polygons(min_vertices=2), "Expected min_vertices >= 3, got min_vertices=2"),
        (lambda: hs.polygons(min_vertices=6, max_vertices=4), "Expected min_vertices <= max_vertices"),
        (lambda: hs.polygons(families=("round",)), "Expected a non-empty subset of"),
        (lambda: hs.polygons(convex=1), "Expected bool for convex, got convex=1 (type=int)"),
        (lambda: hs.polygons(dtype=torch.int64), "Expected a floating torch.dtype for dtype"),
        (lambda: hs.polygons(max_magnitude=-1.0), "Expected a finite max_magnitude > 0, got max_magnitude=-1.0"),
        (lambda: hs.polygons(min_magnitude=10.0, max_magnitude=1.0), "Expected min_magnitude <= max_magnitude"),
        (lambda: hs.polygon_pairs(relations=("far",)), "Expected a non-empty subset of"),
        (lambda: hs.polygon_samples(size=1), "Expected size >= 2, got size=1"),
        (lambda: hs.polygon_samples(seeds=3), "Expected a SearchStrategy for seeds"),
    ],
)
def test_bad_polygon_arguments_raise_invalid_argument(call, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        call()
