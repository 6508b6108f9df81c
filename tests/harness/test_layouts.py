"""Output layouts (issue 9): a head in another version's layout gets a verdict about the head, not about the layout.

The heads and the fork-style loss are in `_forkheads.py`: an Ultralytics 8.3-era Polygon fork (`(maps, polygons)` in
training, `(y, (maps, polygons))` in eval, `poly_shape`, a loss built from a model) and an 8.3 Detect (a list of
per-level maps)."""

from __future__ import annotations

import inspect

import pytest
import torch

import losses

from headguard import HeadSpec, UsageError
from headguard.adapters.ultralytics import ultralytics_loss
from headguard.layouts import FORK_TUPLE, LAYOUTS, ULTRALYTICS_83, Geometry, detect_layout
from headguard.runner import run_checks, select_checks
from headguard.targets import subject_from

from ._forkheads import (
    Detect83, Polygon83, Polygon83ForgetsPriors, v8PolygonLoss, v8PolygonLossTensorItems, v8PolygonLossWithNames,
)

pytest.importorskip("ultralytics")

FORK_LOSS = ultralytics_loss(v8PolygonLoss, polygon=12.0)
# What a user writes for an 8.3 fork: one HeadSpec naming the head and its loss (and, for the detection-terms check,
# its detection loss: this fork's is built on the 8.4 assigner, so ours); the layout is detected.
FORK = HeadSpec(head=Polygon83, loss=FORK_LOSS, detection_loss=losses.DetectionLoss.for_head)
# Checks that read every output, call the loss with named outputs and run the training step on the raw ones.
READERS = ["check_output_contract", "check_decode_consistency", "check_class_prior", "check_initial_predictions_sane",
           "check_loss_batch_replication", "check_loss_rejects_nonfinite", "check_polygon_gradient_at_init",
           "check_polygon_detection_terms_match", "check_clipping_bounds_update"]


def verdicts(subject, names):
    chain = select_checks(subject, select=names)
    return {r.name: (r.status, r.message) for r in run_checks(subject, chain, profile="ci")}


def test_the_fork_layout_is_detected_with_its_polygons():
    subject = subject_from(FORK, name="forkheads:FORK")
    assert subject.layout is FORK_TUPLE and subject.layout_detected
    assert {"polygons", "dfl"} <= subject.capabilities and subject.num_vertices == 8


def test_a_fork_heads_verdict_holds_no_layout_noise():
    got = verdicts(subject_from(FORK, name="forkheads:FORK"), READERS)
    assert {name: status for name, (status, _) in got.items()} == dict.fromkeys(READERS, "passed"), got


def test_a_forks_real_bug_is_found_through_its_layout():
    """R1 in a fork (bias_init without the parent's): the class-prior check names it, as on the reference."""
    subject = subject_from(HeadSpec(head=Polygon83ForgetsPriors, loss=FORK_LOSS), name="forkheads:R1")
    status, message = verdicts(subject, ["check_class_prior"])["check_class_prior"]
    assert status == "failed" and "bias_init() must set every class bias from the prior" in message


def test_a_declared_layout_that_does_not_fit_is_one_failure_with_a_hint():
    subject = subject_from(HeadSpec(head=Polygon83, loss=FORK_LOSS, layout="ultralytics-8.4"), name="forkheads:X")
    results = run_checks(subject, select_checks(subject), profile="ci")
    assert [r.name for r in results if r.status == "failed"] == ["check_output_contract"]
    assert {r.status for r in results[1:]} == {"skipped"}
    assert "it looks like the fork-tuple layout: pass HeadSpec(layout='fork-tuple')" in results[0].message


def test_an_8_3_detect_is_checked_with_the_reference_loss_through_its_layout():
    subject = subject_from(Detect83, name="forkheads:Detect83")
    assert subject.layout is ULTRALYTICS_83
    names = ["check_output_contract", "check_loss_batch_replication", "check_clipping_bounds_update",
             "check_training_canary"]
    got = verdicts(subject, names)
    assert {name: status for name, (status, _) in got.items()} == dict.fromkeys(names, "passed"), got


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_pack_is_the_inverse_of_parse(layout):
    geometry = Geometry(nc=3, reg_max=4)
    maps = [torch.randn(2, 19, h, w) for h, w in ((4, 6), (2, 3), (1, 2))]
    flat = torch.cat([m.flatten(2) for m in maps], 2)
    named = {"boxes": flat[:, :16], "scores": flat[:, 16:], "feats": maps, "polygons": torch.randn(2, 8, 32)}
    if layout.style == "level-list":
        named.pop("polygons")
    raw = layout.pack_train(named, geometry)
    assert detect_layout(raw) is layout
    again = layout.parse_train(raw, geometry)
    assert set(again) == set(named) and all(
        torch.equal(again[k], named[k]) for k in named if k != "feats")


def test_an_8_3_subclass_under_8_4_is_told_the_installed_parent_signature(tmp_path, monkeypatch, capsys):
    """8.3's Detect took (nc, ch); 8.4's takes (nc, reg_max, end2end, ch): a subclass passing ch positionally breaks."""
    from ultralytics.nn.modules.head import Detect

    from headguard.cli import main

    (tmp_path / "oldfork.py").write_text(
        "from ultralytics.nn.modules.head import Detect\n\n"
        "class OldHead(Detect):\n"
        "    def __init__(self, nc=80, ch=()):\n"
        "        super().__init__(nc, ch)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "oldfork:OldHead"]) == 2
    err = capsys.readouterr().err
    assert "in the installed Ultralytics 8.4" in err and f"Detect{inspect.signature(Detect.__init__)}" in err


def test_the_report_names_the_layout_and_loss_of_every_target(tmp_path, monkeypatch, capsys):
    import json

    from headguard.cli import main

    (tmp_path / "forkspec.py").write_text(
        "from headguard import HeadSpec\n"
        "from headguard.adapters.ultralytics import ultralytics_loss\n"
        "from tests.harness._forkheads import Polygon83, v8PolygonLoss\n"
        "SPEC = HeadSpec(head=Polygon83, loss=ultralytics_loss(v8PolygonLoss, polygon=12.0))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.json"
    assert main(["check", "forkspec:SPEC", "heads:Detect", "--select", "check_output_contract", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    subjects = json.loads(path.read_text())["subjects"]
    assert subjects == {
        "forkspec:SPEC": "layout fork-tuple (detected), loss "
                         "headguard.adapters.ultralytics.ultralytics_loss(v8PolygonLoss)",
        "heads:Detect": "layout ultralytics-8.4 (detected), loss losses.detection.DetectionLoss.for_head",
    }
    assert all(f"; {text})" in out for text in subjects.values())


def test_items_as_one_tensor_are_named_by_the_spec_or_by_the_loss():
    """8.3's losses return their items as a tensor: named by HeadSpec(item_names=...) or the loss's loss_names."""
    names = ("box_loss", "polygon_loss", "cls_loss", "dfl_loss")
    tensor_items = ultralytics_loss(v8PolygonLossTensorItems, polygon=12.0)
    with pytest.raises(UsageError, match=r"as its items; name them with HeadSpec\(item_names="):
        subject_from(HeadSpec(head=Polygon83, loss=tensor_items), name="forkheads:unnamed")
    oracle = losses.DetectionLoss.for_head
    for spec in (HeadSpec(head=Polygon83, loss=tensor_items, item_names=names, detection_loss=oracle),
                 HeadSpec(head=Polygon83, loss=ultralytics_loss(v8PolygonLossWithNames, polygon=12.0),
                          detection_loss=oracle)):
        subject = subject_from(spec, name="forkheads:named")
        got = verdicts(subject, ["check_loss_batch_replication", "check_polygon_detection_terms_match"])
        assert {name: status for name, (status, _) in got.items()} == dict.fromkeys(got, "passed"), got


def test_a_forks_detection_terms_are_not_held_to_our_assigner_unless_it_says_so():
    """An 8.3 fork's assigner differs from ours: without HeadSpec(detection_loss=...) there is no oracle (skipped)."""
    subject = subject_from(HeadSpec(head=Polygon83, loss=FORK_LOSS), name="forkheads:no_oracle")
    status, message = verdicts(subject, ["check_polygon_detection_terms_match"])["check_polygon_detection_terms_match"]
    assert status == "skipped" and "HeadSpec(detection_loss=...)" in message
