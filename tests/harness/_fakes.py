"""Fake checks, a fake catalogue and the source of a fake target module, for testing the harness without the real
catalogue (which lives in headguard.checks and is tested by tests/meta)."""

from __future__ import annotations

import pathlib

import torch
from hypothesis import given
from hypothesis import strategies as st

from headguard.registry import Check, CheckFailure, CheckSkipped


def make_check(func, *, area: str = "head", requires=()) -> Check:
    doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
    return Check(func.__name__, area, func, frozenset(requires), doc)


SEEN_RANDOM: list[float] = []


def check_passes(subject, ctx):
    """The head's training outputs are finite."""
    out = subject.build_head()(subject_feats(subject))
    if not all(bool(torch.isfinite(t).all()) for t in (out["boxes"], out["scores"])):
        raise CheckFailure("non-finite training output")


def check_fails(subject, ctx):
    """A property that never holds."""
    raise CheckFailure("cv3.0.bias was never set by bias_init()", example="feats=[(1, 16, 8, 8)]")


def check_hypothesis_fails(subject, ctx):
    """Integers stay below 6 (they don't)."""

    @given(st.integers(min_value=0, max_value=100))
    def inner(n):
        if n > 5:
            raise CheckFailure(f"got n={n}, expected n <= 5")

    inner()


def check_errors(subject, ctx):
    """A check that crashes."""
    return {}["missing key"]


def check_skips(subject, ctx):
    """A check that does not apply."""
    raise CheckSkipped("needs a CUDA device")


def check_polygons_only(subject, ctx):
    """Only for heads that produce polygons."""
    if "polygons" not in subject.build_head()(subject_feats(subject)):
        raise CheckFailure("a head with the polygons capability returned no polygons")


def subject_feats(subject):
    return [torch.randn(shape) for shape in subject.feature_shapes((64, 64), batch=1)]


def check_records_seed(subject, ctx):
    """Records the first torch.rand() value, to show the runner seeded torch."""
    SEEN_RANDOM.append(float(torch.rand(())))


PASSING = [make_check(check_passes), make_check(check_records_seed)]
FAILING = [make_check(check_fails), make_check(check_hypothesis_fails)]
CATALOGUE = [
    make_check(check_passes),
    make_check(check_fails),
    make_check(check_hypothesis_fails, area="loss"),
    make_check(check_errors, area="forward"),
    make_check(check_skips, area="training"),
    make_check(check_polygons_only, area="loss", requires={"polygons"}),
    make_check(check_records_seed),
]

# The source of a target module as users write it; tests copy it into a temporary directory.
TARGET_MODULE = (pathlib.Path(__file__).parent / "_tinyheads.py").read_text()
BROKEN_MODULE = "raise RuntimeError('boom while importing')\n"
