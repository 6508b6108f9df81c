"""The catalogue on the reference heads: every applicable check passes, or fails exactly as the reference declares
(an expected failure with its reason, strict: a declared failure that passes is reported)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

import heads
import losses
from headguard.reference import REFERENCE_LOSS_EXPECTED_FAILURES, REFERENCE_SPECS, covering_spec
from headguard.registry import CATALOGUE, CheckContext, CheckFailure
from headguard.runner import run_check, select_checks
from headguard.subject import ExpectedFailure, HeadSpec, build_subject

_SUBJECTS = {cls.__name__: build_subject(spec, cls.__name__) for cls, spec in REFERENCE_SPECS.items()}

# Bugs the catalogue finds in the reference that the reference must not declare (they are bugs, not design): check
# name -> reason, run as strict xfails so the fix shows up as an XPASS to remove. Empty now: the dtype matrix's
# finding (fp16 predictions -> assigner in fp16, eps 1e-9 == 0, 0/0 NaN) was fixed in losses/detection.py.
REFERENCE_BUGS: dict[str, str] = {}


def _cases():
    for name, subject in _SUBJECTS.items():
        for chk in select_checks(subject):
            marks = []
            if chk.name in REFERENCE_BUGS:
                marks.append(pytest.mark.xfail(raises=CheckFailure, strict=True, reason=REFERENCE_BUGS[chk.name]))
            yield pytest.param(name, chk.name, marks=marks, id=f"{name}-{chk.name}")


def _ctx() -> CheckContext:
    return CheckContext(profile=settings.get_current_profile_name(), seed=0)


@pytest.mark.parametrize(("head", "check_name"), list(_cases()))
def test_reference_head(head, check_name):
    subject = _SUBJECTS[head]
    if check_name in subject.expected_failures:
        # A declared expected failure must fail for its declared cause: the runner matches the message to it.
        result = run_check(subject, CATALOGUE[check_name], profile=_ctx().profile)
        assert result.status == "xfailed", result.message
        return
    CATALOGUE[check_name](subject, _ctx())


def test_every_check_applies_to_the_polygon_head():
    """The polygon reference exercises the whole catalogue; the detection one all but the polygon-only checks."""
    head_checks = {c.name for c in CATALOGUE.values() if c.kind == "head"}
    assert {c.name for c in select_checks(_SUBJECTS["Polygon"])} == head_checks
    assert {c.name for c in CATALOGUE.values() if c.kind == "head" and not c.applies_to(_SUBJECTS["Detect"])} == {
        "check_polygon_detection_terms_match", "check_polygon_gradient_at_init"
    }


def test_expected_failures_name_real_checks_and_give_reasons():
    assert REFERENCE_LOSS_EXPECTED_FAILURES
    for name, expected in REFERENCE_LOSS_EXPECTED_FAILURES.items():
        assert name in CATALOGUE and len(expected.reason) > 40 and expected.match


def test_a_users_head_with_the_reference_loss_inherits_its_expected_failures():
    """The R11 expectation belongs to the default loss: any head checked with it gets it, an own loss does not."""
    with_default_loss = build_subject(HeadSpec(heads.Detect, expected_failures={"check_loss_pure": "x" * 50}), "a")
    assert dict(with_default_loss.expected_failures) == {
        **REFERENCE_LOSS_EXPECTED_FAILURES, "check_loss_pure": ExpectedFailure("x" * 50)
    }
    own_loss = build_subject(HeadSpec(heads.Detect, loss=losses.DetectionLoss.for_head), "b")
    assert dict(own_loss.expected_failures) == {}


@pytest.mark.parametrize("head_cls", [heads.Detect, heads.Polygon], ids=lambda c: c.__name__)
def test_assigner_coverage_passes_with_ensure_coverage(head_cls):
    """The R11 remedy: with AssignerConfig(ensure_coverage=True) the declared failure goes away."""
    subject = build_subject(covering_spec(head_cls), f"{head_cls.__name__}+ensure_coverage")
    loss = subject.build_loss(subject.build_head())
    assert (loss.detection if hasattr(loss, "detection") else loss).assigner.ensure_coverage
    CATALOGUE["check_assigner_coverage"](subject, _ctx())


def test_canary_records_its_curves():
    """The canary records each loss item, the gradient norm and the BatchNorm range per step (for --plots)."""
    result = run_check(_SUBJECTS["Polygon"], CATALOGUE["check_training_canary"], profile="ci")
    curves = result.series["canary"]
    assert {"loss", "box_loss", "polygon_loss", "cls_loss", "dfl_loss", "grad_norm", "skipped", "bn_mean_min",
            "bn_mean_max", "bn_var_min", "bn_var_max"} <= set(curves)
    assert {len(v) for v in curves.values()} == {30}
    assert curves["loss"][-1] < curves["loss"][0] and not any(curves["skipped"])
    assert all(torch.isfinite(torch.tensor(curves["loss"]))) and min(curves["bn_var_min"]) > 0
