"""Ultralytics' own losses as headguard loss factories, and the default spec of Ultralytics' own heads.

`default_spec_for(head_class)` is what `headguard check ultralytics.nn.modules.head:Pose` (Detect, Segment, OBB, and
user subclasses of them) runs with: the head's own task loss (`v8DetectionLoss`, `v8SegmentationLoss`, `v8PoseLoss`,
`v8OBBLoss`) built by `ultralytics_loss` with Ultralytics' DEFAULT_CFG hyperparameters, and that loss's known failures
pinned to their cause. `v8_detection_loss` / `detection_loss` are the detection loss alone (the oracle of our tests
and benchmarks, and a loss for forks)::

    from headguard import HeadSpec
    from headguard.adapters.ultralytics import detection_loss
    SPEC = HeadSpec(head=MyForkDetect, loss=detection_loss)      # check a fork's head with v8DetectionLoss

`v8DetectionLoss(model)` reads only `model.args` (box/cls/dfl gains), `model.model[-1]` (a Detect-like module with
`stride`, `nc`, `reg_max`) and the device of `next(model.parameters())`; the stand-in below offers exactly that, so no
Ultralytics model has to be built. Importing this module needs `ultralytics` installed (the `test` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from headguard.reference import R11
from headguard.subject import HeadSpec

# Ultralytics' default gains; our DetectionGains default to the same values.
DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class _DetectAttributes(nn.Module):
    """The attributes v8DetectionLoss reads from the last module: stride (a plain tensor), nc, reg_max."""

    def __init__(self, nc: int, reg_max: int, strides: Sequence[float], device: torch.device):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.stride = torch.tensor([float(s) for s in strides], dtype=torch.float32)
        # One frozen parameter, so that next(model.parameters()) names the device the criterion must live on.
        self.device_marker = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


class _StandInModel(nn.Module):
    def __init__(self, nc, reg_max, strides, device, gains: Mapping[str, float]):
        super().__init__()
        self.args = SimpleNamespace(**{**DEFAULT_GAINS, **gains})
        self.model = nn.ModuleList([_DetectAttributes(nc, reg_max, strides, torch.device(device))])


def v8_detection_loss(
    nc: int, strides: Sequence[float], reg_max: int = 16, *, device="cpu", gains: Mapping[str, float] | None = None
):
    """Ultralytics' v8DetectionLoss for these settings (its defaults: top-k 10, alpha 0.5, beta 6)."""
    from ultralytics.utils.loss import v8DetectionLoss

    strides = strides.tolist() if isinstance(strides, torch.Tensor) else list(strides)
    return v8DetectionLoss(_StandInModel(nc, reg_max, strides, device, gains or {}))


class _ModelAround(nn.Module):
    """A stand-in for an Ultralytics model around one head: `args` (hyperparameters), `model[-1]` (the head itself)
    and the head's parameters, which is what a fork's loss class reads from the model it is built with."""

    def __init__(self, head: nn.Module, hyperparameters: Mapping[str, Any]):
        super().__init__()
        self.args = SimpleNamespace(**hyperparameters)
        self.model = nn.ModuleList([head])


def ultralytics_loss(loss_class: Callable[[nn.Module], Any], **overrides: Any) -> Callable[[nn.Module], Any]:
    """A `HeadSpec(loss=...)` factory for a loss class built from a model, as Ultralytics' and its forks' are:
    `loss_class(model)` with `model.args` = Ultralytics' default hyperparameters updated by `overrides` (for
    example `polygon=12.0`) and `model.model[-1]` = the head under test::

        SPEC = HeadSpec(head=MyPolygon, loss=ultralytics_loss(v8PolygonLoss, polygon=12.0))
    """
    from ultralytics.utils import DEFAULT_CFG

    hyperparameters = {**vars(DEFAULT_CFG), **overrides}

    def build(head: nn.Module) -> Any:
        return loss_class(_ModelAround(head, hyperparameters))

    build.__qualname__ = f"ultralytics_loss({getattr(loss_class, '__qualname__', loss_class)!s})"
    return build


def detection_loss(head: nn.Module):
    """A `HeadSpec(loss=...)` factory: v8DetectionLoss for the head's nc, stride and reg_max, on its device."""
    device = next(head.parameters()).device
    return v8_detection_loss(int(head.nc), head.stride, int(head.reg_max), device=device)


# Ultralytics' task heads and the loss its trainer builds for each (ultralytics.nn.tasks: DetectionModel,
# SegmentationModel, PoseModel, OBBModel.init_criterion), by the head's class name in ultralytics.nn.modules.head.
TASK_LOSSES = {"Detect": "v8DetectionLoss", "Segment": "v8SegmentationLoss", "Pose": "v8PoseLoss", "OBB": "v8OBBLoss"}
_HEAD_MODULE = "ultralytics.nn.modules.head"
# Widths beyond the default channels that the checks do not need, as the harness builds every head small: Segment's
# prototype branch at its shipped 256 channels made its verdict 16 s instead of 10 s on a 2-core CPU.
SMALL_WIDTHS = {"Segment": {"npr": 32}}

# What every one of these losses knowingly fails, with the cause it must fail for (a failure of another cause is
# reported). Their assigner is the one our reference loss reproduces, so R11 is theirs as well (reported upstream).
KNOWN_FAILURES = {"check_assigner_coverage": R11}


def ultralytics_head_of(head_class: type) -> type | None:
    """The Ultralytics task head `head_class` is or derives from (the nearest one in its MRO), or None when the
    nearest Ultralytics head class is not one of TASK_LOSSES (YOLO26's Pose26, v10Detect, ...: their trainers build
    other losses) or there is none."""
    for cls in head_class.__mro__:
        if cls.__module__ == _HEAD_MODULE:
            return cls if cls.__name__ in TASK_LOSSES else None
    return None


def default_spec_for(head_class: type) -> HeadSpec | None:
    """The spec an Ultralytics task head (or a subclass of one) is checked with when none is given: its own task loss
    with DEFAULT_CFG hyperparameters and KNOWN_FAILURES. None for any other class (Ultralytics is imported only for
    an Ultralytics head)."""
    if not isinstance(head_class, type):
        return None
    task_head = ultralytics_head_of(head_class)
    if task_head is None:
        return None
    from ultralytics.utils import loss as ultralytics_losses

    loss_class = getattr(ultralytics_losses, TASK_LOSSES[task_head.__name__])
    family = "detection" if loss_class.__name__ == "v8DetectionLoss" else None  # ours equals it (tests/oracle)
    return HeadSpec(head=head_class, loss=ultralytics_loss(loss_class), expected_failures=dict(KNOWN_FAILURES),
                    loss_family=family, head_kwargs=dict(SMALL_WIDTHS.get(task_head.__name__, {})))


__all__ = [
    "DEFAULT_GAINS", "KNOWN_FAILURES", "TASK_LOSSES", "default_spec_for", "detection_loss", "ultralytics_head_of",
    "ultralytics_loss", "v8_detection_loss",
]
