"""A subject: everything the checks need to know about one head under test, and nothing about how it was named."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

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
    """

    head: Callable[..., nn.Module]
    loss: Callable[[nn.Module], Callable] | None = None
    head_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_step: Callable | None = None
    expected_failures: Mapping[str, str | ExpectedFailure] = dataclasses.field(default_factory=dict)
    strides: tuple[float, ...] = DEFAULT_STRIDES
    timeout: float | None = None


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
    # What setting the subject up revealed that the report should show: global torch state the constructor changed,
    # a size warning.
    setup_notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.expected_failures = {k: ExpectedFailure.of(v) for k, v in self.expected_failures.items()}

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.prototype.parameters())

    def build_head(self) -> nn.Module:
        return copy.deepcopy(self.prototype).train()

    def build_loss(self, head: nn.Module) -> Callable:
        return self.loss_factory(head)

    @property
    def num_vertices(self) -> int:
        """Vertices per polygon (0 for heads without polygons)."""
        return int(getattr(self.prototype, "np", 0)) if "polygons" in self.capabilities else 0

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
    capabilities = _capabilities(head, channels, strides)
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
    )


def _capabilities(head: nn.Module, channels: tuple[int, ...], strides: tuple[float, ...]) -> frozenset[str]:
    """What the head produces, found by running it once rather than by its class name."""
    probe = copy.deepcopy(head).train()
    feats = [torch.randn(1, c, max(1, int(64 // s)), max(1, int(64 // s))) for c, s in zip(channels, strides)]
    with torch.no_grad():
        out = probe(feats)
    caps = set()
    if isinstance(out, Mapping) and "polygons" in out:
        caps.add("polygons")
    if int(getattr(head, "reg_max", 1)) > 1:
        caps.add("dfl")
    return frozenset(caps)


def _default_loss(capabilities: frozenset[str]) -> Callable[[nn.Module], Callable]:
    import losses

    return losses.PolygonLoss.for_head if "polygons" in capabilities else losses.DetectionLoss.for_head
