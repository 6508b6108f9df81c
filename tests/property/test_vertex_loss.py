"""PolygonLoss(vertex_loss=fn): a user's shape loss (the signature of losses.mgiou) is the vertex term, alone or blended
from l2 by mode="hybrid"; the fast path calls the same one; misuse raises; the catalogue catches a broken one."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import headguard.checks  # noqa: F401  (registers the catalogue)
import heads
from headguard import CATALOGUE, HeadSpec, build_subject
from headguard.runner import run_checks
from losses import LossInputError, PolygonLoss, mgiou, polygons_to_targets

NC, NP = 2, 6
STRIDES = (8.0, 16.0, 32.0)
SIZE = 64
A = sum((SIZE // int(s)) ** 2 for s in STRIDES)
seeds = st.integers(0, 2**16)


def make_preds(seed: int, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "boxes": torch.randn(batch, 64, A, generator=gen),
        "scores": torch.randn(batch, NC, A, generator=gen),
        "polygons": torch.randn(batch, 2 * NP, A, generator=gen) * 0.5,
        "feats": [torch.zeros(batch, 1, SIZE // int(s), SIZE // int(s)) for s in STRIDES],
    }


def make_batch(seed: int) -> dict:
    """Four objects in two images, convex polygons of 3..NP vertices (padded to NP) inside their boxes."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(4, 2, generator=gen) * 0.4 + 0.3
    wh = torch.rand(4, 2, generator=gen) * 0.3 + 0.2
    rings = []
    for k in range(4):
        v = int(torch.randint(3, NP + 1, (), generator=gen))
        angles = (torch.rand(v, generator=gen) + torch.arange(v)) * (2 * math.pi / v)
        rings.append(centre[k] + torch.stack((angles.cos(), angles.sin()), 1) * wh[k] / 2)
    polygons, mask = polygons_to_targets(rings, NP)
    return {"batch_idx": torch.tensor([0.0, 0.0, 1.0, 1.0]), "cls": torch.tensor([[0.0], [1.0], [1.0], [0.0]]),
            "bboxes": torch.cat((centre, wh), 1), "polygons": polygons, "polygon_mask": mask}


def polygon_term(loss: PolygonLoss, seed: int, progress: float = 0.5) -> torch.Tensor:
    return loss(make_preds(seed), make_batch(seed), progress)[1]["polygon_loss"]


def make_loss(**kwargs) -> PolygonLoss:
    return PolygonLoss(NC, STRIDES, np=NP, **kwargs)


def twice_mgiou(pred, target, pred_mask=None, target_mask=None):
    return 2 * mgiou(pred, target, pred_mask, target_mask)


def unit_loss(pred, target, pred_mask=None, target_mask=None):
    return pred.new_ones(pred.shape[0])


# ------------------------------------------------------------------------------------------- the seam does its job
@given(seeds)
def test_a_user_shape_loss_is_the_vertex_term(seed):
    mgiou_term = polygon_term(make_loss(mode="mgiou"), seed)
    torch.testing.assert_close(polygon_term(make_loss(vertex_loss=twice_mgiou), seed), 2 * mgiou_term,
                               rtol=1e-6, atol=0)
    # A loss of 1 per positive leaves the normalised weights: gain * sum(w) / max(1, sum of target scores).
    loss = make_loss(vertex_loss=unit_loss)
    terms = loss.terms(make_preds(seed), make_batch(seed))
    expected = terms.weight.sum() / terms.detection.target_scores_sum * loss.gains.polygon
    torch.testing.assert_close(terms.vector[1], expected.to(terms.vector.dtype))


@given(seeds, st.floats(0.0, 1.0))
def test_hybrid_blends_l2_into_the_user_shape_loss(seed, progress):
    l2 = polygon_term(make_loss(mode="l2"), seed, progress)
    shape = polygon_term(make_loss(vertex_loss=twice_mgiou), seed, progress)
    hybrid = polygon_term(make_loss(mode="hybrid", vertex_loss=twice_mgiou), seed, progress)
    torch.testing.assert_close(hybrid, (1 - progress) * l2 + progress * shape, rtol=1e-5, atol=1e-6)


@given(seeds)
def test_explicit_mgiou_is_exactly_the_mgiou_mode(seed):
    for mode in ("mgiou", "hybrid"):
        assert torch.equal(polygon_term(make_loss(mode=mode, vertex_loss=mgiou), seed),
                           polygon_term(make_loss(mode=mode), seed))
    assert torch.equal(polygon_term(make_loss(vertex_loss=mgiou), seed), polygon_term(make_loss(mode="mgiou"), seed))


def test_the_shape_loss_gets_the_positives_vertices_in_stride_units_and_the_target_mask():
    calls = []

    def recording(pred, target, pred_mask=None, target_mask=None):
        calls.append((pred, target, pred_mask, target_mask))
        return mgiou(pred, target, pred_mask, target_mask)

    preds, batch = make_preds(0), make_batch(0)
    terms = make_loss(vertex_loss=recording).terms(preds, batch)
    ((pred, target, pred_mask, target_mask),) = calls
    assert pred.dtype == target.dtype == torch.float32 and pred_mask is None
    assert torch.equal(pred, terms.pred) and torch.equal(target, terms.target)
    assert torch.equal(target_mask, terms.mask) and not bool(target_mask.all())  # padded vertices are marked


@pytest.mark.parametrize("mode", [None, "hybrid"])
@given(seed=seeds)
def test_the_fast_path_calls_the_same_shape_loss(mode, seed):
    reference = make_loss(mode=mode, vertex_loss=twice_mgiou)
    fast = make_loss(mode=mode, vertex_loss=twice_mgiou, cuda_graphs=True)
    preds, batch = make_preds(seed), make_batch(seed)
    torch.testing.assert_close(fast(preds, batch, 0.3)[0], reference(preds, batch, 0.3)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- misuse
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(vertex_loss="mgiou"), TypeError, r"vertex_loss is 'mgiou' \(type str\); expected a callable"),
        (dict(vertex_loss=torch.zeros(3)), TypeError, r"; expected a callable fn"),
        (dict(mode="l2", vertex_loss=twice_mgiou), ValueError, r"vertex_loss is .* with mode='l2', which uses no shape loss; expected"),
        (dict(mode="mgiou", vertex_loss=twice_mgiou), ValueError, r"vertex_loss is .* with mode='mgiou', which selects losses.mgiou; expected"),
        (dict(mode="giou"), ValueError, r"mode is 'giou'; expected one of \('l2', 'mgiou', 'hybrid'\) or None"),
    ],
)
def test_misuse_raises_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_loss(**kwargs)


@pytest.mark.parametrize(
    ("result", "found"),
    [
        (lambda p: torch.zeros(p.shape[0], NP), r"shape \(\d+, 6\)"),
        (lambda p: p.sum().reshape(1, 1), r"shape \(1, 1\)"),
        (lambda p: torch.zeros(p.shape[0], dtype=torch.long), "dtype torch.int64"),
        (lambda p: 0.5, "float"),
    ],
)
def test_a_shape_loss_returning_anything_but_one_loss_per_polygon_is_named(result, found):
    def wrong(pred, target, pred_mask=None, target_mask=None):
        return result(pred)

    with pytest.raises(ValueError, match=rf"vertex_loss .*wrong.* returned .*{found}.*; expected a floating tensor of "
                                         r"shape \(\d+,\), one loss per polygon"):
        polygon_term(make_loss(vertex_loss=wrong), 0)


def test_a_shape_loss_error_is_not_an_input_error():
    # The loss's own input checks run first: bad input is reported as such, whatever the shape loss.
    batch = make_batch(0)
    batch["polygons"][0, 0, 0] = math.nan
    with pytest.raises(LossInputError, match=r"batch\['polygons'\] \(real vertices\) has 1 non-finite"):
        make_loss(vertex_loss=unit_loss)(make_preds(0), batch)


# --------------------------------------------------------------------------------------------- caught by the checks
def area_normalised_l1(pred, target, pred_mask=None, target_mask=None):
    """Broken: L1 vertex error over the target's bounding-box area, unguarded: 0/0 on degenerate polygons."""
    extent = target.amax(1) - target.amin(1)
    return (pred - target).abs().sum((1, 2)) / (extent[:, 0] * extent[:, 1])


CHECKS = ("check_loss_finite_degenerate_targets", "check_gradients_finite_when_loss_finite",
          "check_polygon_gradient_at_init")


@functools.cache
def _verdicts(vertex_loss) -> dict[str, tuple[str, str]]:
    spec = HeadSpec(heads.Polygon, loss=functools.partial(PolygonLoss.for_head, vertex_loss=vertex_loss))
    records = run_checks(build_subject(spec, "Polygon with a user vertex_loss"), [CATALOGUE[n] for n in CHECKS],
                         profile="ci", seed=0)
    return {r.name: (r.status, r.message) for r in records}


def test_the_catalogue_catches_a_broken_user_shape_loss():
    status, message = _verdicts(area_normalised_l1)["check_loss_finite_degenerate_targets"]
    assert status == "failed" and "on degenerate targets" in message, message


def test_the_catalogue_passes_a_sound_user_shape_loss():
    assert {name: v[0] for name, v in _verdicts(twice_mgiou).items()} == dict.fromkeys(CHECKS, "passed")
