"""A subject: everything the checks need to know about one head under test, and nothing about how it was named."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from headguard.cloning import fresh_copy
from headguard.layouts import ULTRALYTICS_84, Geometry, Layout, LayoutMismatch, capabilities_of, detect_layout
from headguard.layouts import layout_named

DEFAULT_CHANNELS = (16, 32, 64)
DEFAULT_STRIDES = (8.0, 16.0, 32.0)
DEFAULT_NC = 2


@dataclasses.dataclass(frozen=True)
class ExpectedFailure:
    """A check the subject is known to fail, with its cause, so a known bug never hides a failure of another cause.

    reason: why it fails (shown in the report).
    match: a regular expression that must occur (`re.search`) in the check's failure message; None matches any.
    raises: exception types; when given, a check that *raises* one of them (an error, not a failed property) counts
        as the expected failure too.
    """

    reason: str
    match: str | None = None
    raises: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise TypeError(f"Expected a non-empty string for reason, got reason={self.reason!r}")
        if self.match is not None:
            re.compile(self.match)
        raises = self.raises if isinstance(self.raises, tuple) else (self.raises,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in raises):
            raise TypeError(f"Expected exception types for raises, got raises={self.raises!r}")
        object.__setattr__(self, "raises", raises)

    def covers(self, status: str, message: str, exception: BaseException | None) -> bool:
        """Whether a check's outcome is this expected failure: a failed property whose message matches, or an error
        of one of the `raises` types."""
        if status == "failed":
            return self.match is None or re.search(self.match, message) is not None
        return status == "error" and bool(self.raises) and isinstance(exception, self.raises)

    @classmethod
    def of(cls, value: str | ExpectedFailure) -> ExpectedFailure:
        """A reason string is an expected failure of any cause (the form HeadSpec has always accepted)."""
        return value if isinstance(value, ExpectedFailure) else cls(value)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """How to build a head under test and its loss, for heads that are not drop-in Ultralytics-style classes.

    head: the head class (or any callable returning an `nn.Module`), called with `head_kwargs`.
    loss: a callable that takes the built head and returns the criterion `loss(preds, batch) -> (vector, items)`;
        `None` picks `PolygonLoss` when the head produces "polygons", else `DetectionLoss`.
    head_kwargs: passed to `head`, over the defaults nc=2, ch=(16, 32, 64) (small: checks run in milliseconds).
    train_step: replaces `headguard.training.train_step` when given.
    expected_failures: check name -> reason string or `ExpectedFailure` (a reason with the cause it must match);
        such a check failing is reported as xfailed. With `loss=None` the reference loss's own expected failures
        (`headguard.reference.REFERENCE_LOSS_EXPECTED_FAILURES`) are added.
    strides: one per level, set as `head.stride` before `bias_init()`.
    timeout: seconds each check may run on this subject; None takes the run's limit (`--timeout`, the profile's).
    loss_family: the reference loss family the head's own loss claims to equal ("detection", "polygon",
        "polygon-mgiou"; `headguard.reference.LOSS_FAMILIES`), checked by check_loss_matches_reference_family; with
        `loss=None` it is the reference loss's own.
    detection_loss: the detection loss of the head's own loss family (a factory like `loss`): the oracle
        check_polygon_detection_terms_match compares a polygon loss's box/cls/dfl terms with; None uses ours for a
        loss of our family and skips the check for another.
    item_names: names for a loss that returns its items as one tensor (Ultralytics 8.3's losses do); None takes the
        criterion's own `loss_names` when it has them.
    layout: the head's output layout (a `headguard.layouts` name such as "ultralytics-8.3", or a Layout); None
        detects it from the training output when exactly one layout fits, else assumes "ultralytics-8.4".
    """

    head: Callable[..., nn.Module]
    loss: Callable[[nn.Module], Callable] | None = None
    head_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_step: Callable | None = None
    expected_failures: Mapping[str, str | ExpectedFailure] = dataclasses.field(default_factory=dict)
    strides: tuple[float, ...] = DEFAULT_STRIDES
    timeout: float | None = None
    layout: str | Layout | None = None
    loss_family: str | None = None
    item_names: tuple[str, ...] | None = None
    detection_loss: Callable[[nn.Module], Callable] | None = None


@dataclasses.dataclass
class Subject:
    """One head under test. `build_head()` returns a fresh copy of the initialised head, in train mode."""

    kind: ClassVar[str] = "head"
    name: str
    prototype: nn.Module
    loss_factory: Callable[[nn.Module], Callable]
    train_step: Callable
    strides: tuple[float, ...]
    channels: tuple[int, ...]
    nc: int
    capabilities: frozenset[str]
    expected_failures: Mapping[str, ExpectedFailure]
    seed: int = 0
    timeout: float | None = None
    layout: Layout = ULTRALYTICS_84
    layout_detected: bool = False
    needs_packing: bool = False  # the named outputs differ from what the head returns (see `build_loss`)
    loss_is_reference: bool = False  # the loss is ours (it reads named outputs), not the head's own
    loss_family: str | None = None  # the reference family the loss claims to equal (HeadSpec.loss_family)
    item_names: tuple[str, ...] | None = None  # HeadSpec.item_names, or the loss's loss_names (contracts)
    detection_loss_factory: Callable[[nn.Module], Callable] | None = None  # HeadSpec.detection_loss
    num_vertices: int = 0
    # What setting the subject up revealed that the report should show: global torch state the constructor changed,
    # a size warning.
    setup_notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.expected_failures = {k: ExpectedFailure.of(v) for k, v in self.expected_failures.items()}

    @property
    def description(self) -> str:
        """What the report says the subject was checked with: its layout and its loss."""
        how = "detected" if self.layout_detected else "declared" if self.layout is not ULTRALYTICS_84 else "assumed"
        return f"layout {self.layout.name} ({how}), loss {callable_name(self.loss_factory)}"

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.prototype.parameters())

    def build_head(self) -> nn.Module:
        return fresh_copy(self.prototype).train()

    def build_loss(self, head: nn.Module) -> Callable:
        """The criterion for `head`, taking the named outputs the checks hold (packed into the head's own layout
        before the loss sees them, when that layout is not the named dict itself)."""
        criterion = self.loss_factory(head)
        if self.item_names is not None:  # HeadSpec(item_names=...), or the loss's loss_names found at setup
            criterion = NamedItems(criterion, self.item_names)
        if not self.needs_packing:
            return criterion
        return LayoutAdaptedLoss(criterion, self.layout, self.geometry, wants_named=self.loss_is_reference)

    @property
    def geometry(self) -> Geometry:
        return geometry_of(self.prototype, self.nc)

    def train_outputs(self, out: Any) -> dict[str, Any]:
        """The named outputs of a training forward's result (LayoutMismatch when the layout does not fit)."""
        return self.layout.parse_train(out, self.geometry)

    def eval_outputs(self, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(y, named outputs) of an eval forward's result (LayoutMismatch when the layout does not fit)."""
        return self.layout.parse_eval(out, self.geometry)

    def feature_shapes(self, image_size: tuple[int, int], batch: int = 2) -> list[tuple[int, int, int, int]]:
        """Feature-map shapes (B, C, H, W) for an image of `image_size` (H, W) pixels."""
        h, w = image_size
        return [(batch, c, max(1, round(h / s)), max(1, round(w / s))) for c, s in zip(self.channels, self.strides)]


def build_subject(spec: HeadSpec, name: str) -> Subject:
    """Instantiate the head once (strides set, `bias_init()` run) and derive the subject from what it produces."""
    from headguard.training import train_step as reference_step  # late: training imports torch.optim machinery

    kwargs = {"nc": DEFAULT_NC, "ch": DEFAULT_CHANNELS, **dict(spec.head_kwargs)}
    head = spec.head(**kwargs)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{name}: expected the head factory to return an nn.Module, got {type(head).__name__}")
    strides = tuple(float(s) for s in spec.strides)
    if len(strides) != len(kwargs["ch"]):
        raise ValueError(f"{name}: {len(strides)} strides {strides} for {len(kwargs['ch'])} levels ch={kwargs['ch']}")
    head.stride = torch.tensor(strides)
    if hasattr(head, "bias_init"):
        head.bias_init()
    channels = tuple(int(c) for c in kwargs["ch"])
    layout, detected, preds, needs_packing = _layout_of(spec, head, channels, strides, int(kwargs["nc"]))
    capabilities = capabilities_of(preds)
    if int(getattr(head, "reg_max", 1)) > 1:
        capabilities |= {"dfl"}
    loss_factory = spec.loss or _default_loss(capabilities)
    expected_failures = {name: ExpectedFailure.of(v) for name, v in spec.expected_failures.items()}
    if spec.loss is None:
        from headguard.reference import REFERENCE_LOSS_EXPECTED_FAILURES  # late: reference imports this module

        expected_failures = {**REFERENCE_LOSS_EXPECTED_FAILURES, **expected_failures}
    return Subject(
        name=name,
        prototype=head.train(),
        loss_factory=loss_factory,
        train_step=spec.train_step or reference_step,
        strides=strides,
        channels=channels,
        nc=int(kwargs["nc"]),
        capabilities=capabilities,
        expected_failures=expected_failures,
        timeout=spec.timeout,
        layout=layout,
        layout_detected=detected,
        needs_packing=needs_packing,
        loss_is_reference=spec.loss is None,
        item_names=tuple(spec.item_names) if spec.item_names is not None else None,
        detection_loss_factory=spec.detection_loss,
        loss_family=spec.loss_family or (_reference_family(capabilities) if spec.loss is None else None),
        num_vertices=int(preds["polygons"].shape[1]) // 2 if "polygons" in preds else 0,
    )


def callable_name(fn: Any) -> str:
    """`module.qualname` of a function, method or class (`losses.detection.DetectionLoss.for_head`)."""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def geometry_of(head: nn.Module, nc: int) -> Geometry:
    return Geometry(nc=int(getattr(head, "nc", nc)), reg_max=int(getattr(head, "reg_max", 1)))


def _layout_of(spec: HeadSpec, head: nn.Module, channels, strides, nc: int):
    """(layout, whether it was detected, the named outputs of one probe forward, whether the loss needs them packed
    back): found by running the head once, never by its class name. A head no layout fits gets the 8.4 dict and no
    capabilities: check_output_contract, the gate, then reports the mismatch once."""
    probe = fresh_copy(head).train()
    feats = [torch.randn(1, c, max(1, int(64 // s)), max(1, int(64 // s))) for c, s in zip(channels, strides)]
    with torch.no_grad():
        out = probe(feats)
    layout, detected = (layout_named(spec.layout), False) if spec.layout is not None else (detect_layout(out), True)
    if layout is None:
        return ULTRALYTICS_84, False, {}, False
    geometry = geometry_of(head, nc)
    try:
        preds = layout.parse_train(out, geometry)
    except LayoutMismatch:
        return layout, detected, {}, False
    same = isinstance(out, Mapping) and list(preds) == list(out)  # the named outputs are the head's own dict
    return layout, detected, preds, not same


class NamedItems:
    """A criterion whose items come back as one tensor (or sequence), with `names` put on them: the loss contract is
    `(vector, {name: value})`. A criterion that already returns a mapping passes through. Attributes are the wrapped
    criterion's."""

    def __init__(self, criterion: Callable, names: tuple[str, ...]):
        self.criterion, self.names = criterion, names

    def __call__(self, preds: Any, batch: Mapping[str, torch.Tensor]):
        vector, items = self.criterion(preds, batch)
        if isinstance(items, Mapping):
            return vector, items
        values = list(items.reshape(-1) if isinstance(items, torch.Tensor) else items)
        if len(values) != len(self.names):
            raise ValueError(f"the loss returned {len(values)} items; item_names {self.names} name {len(self.names)}")
        return vector, dict(zip(self.names, values))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["criterion"], name)


class LayoutAdaptedLoss:
    """A criterion and the head's layout between it and its callers. Checks call it with named outputs, a training
    step with what the head returned; the criterion gets what it reads: the head's own loss (`wants_named=False`)
    the head's layout, our reference loss the named outputs. Attributes are the wrapped criterion's (its gains, its
    assigner)."""

    def __init__(self, criterion: Callable, layout: Layout, geometry: Geometry, *, wants_named: bool):
        self.criterion, self.layout, self.geometry, self.wants_named = criterion, layout, geometry, wants_named

    def __call__(self, preds: Any, batch: Mapping[str, torch.Tensor]):
        return self.criterion(self._translated(preds), batch)

    def _translated(self, preds: Any) -> Any:
        if not self.wants_named:  # the head's own loss: the head's layout (raw output passes through)
            return self.layout.pack_train(preds, self.geometry) if isinstance(preds, Mapping) else preds
        if isinstance(preds, Mapping) and self.layout.style != "dict":
            return preds  # already named
        return self.layout.parse_train(preds, self.geometry)  # for the dict layout: renames raw keys only

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["criterion"], name)


def _reference_family(capabilities: frozenset[str]) -> str:
    return "polygon" if "polygons" in capabilities else "detection"


def _default_loss(capabilities: frozenset[str]) -> Callable[[nn.Module], Callable]:
    import losses

    return losses.PolygonLoss.for_head if "polygons" in capabilities else losses.DetectionLoss.for_head
