"""Standalone shape losses as subjects: `ShapeLossSpec` (the loss and the axioms it claims) and `ShapeLossSubject`.

A shape loss is `fn(pred (N, V, 2), target (N, V, 2), pred_mask=None, target_mask=None) -> (N,)`: one loss per pair
of polygons (vertices in order), never reduced over the batch; the caller takes the mean or the sum. The masks
(N, V) bool, True for a real vertex, are optional, and are passed on only when given.

The claims say which axioms the loss promises; the catalogue's `shape_loss` checks are chosen by them
(`headguard list` shows which claim each check needs). Their vocabulary is `CLAIMS`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from headguard.errors import UsageError
from headguard.subject import ExpectedFailure, callable_name

CLAIMS: Mapping[str, str] = {
    "zero_at_match": "loss(p, p) = 0 for every polygon p",
    "bounded": "0 <= loss <= 1 for every pair",
    "symmetric": "loss(p, t) = loss(t, p)",
    "translation_invariant": "moving both polygons by the same vector leaves the loss unchanged",
    "scale_invariant": "scaling both polygons about the same point leaves the loss unchanged",
    "rotation_invariant": "turning both polygons about the same point leaves the loss unchanged",
    "cyclic_shift_invariant": "starting either polygon's vertex list at another vertex leaves the loss unchanged",
    "orientation_invariant": "reversing either polygon's vertex order (clockwise or not) leaves the loss unchanged",
    "repeated_vertex_invariant": "repeating vertices in place (zero-length edges) leaves the loss unchanged",
    "approximates_iou": "on overlapping convex pairs the loss ranks like 1 - IoU (Spearman rho >= 0.9)",
}
# The MGIoU family's promises: every claim except approximates_iou, which a loss must opt into.
DEFAULT_CLAIMS = frozenset(CLAIMS) - {"approximates_iou"}


class ShapeLossError(UsageError, ValueError):
    """A shape loss that cannot be checked (it returns the wrong shape, raises on an ordinary pair); one line."""


@dataclasses.dataclass(frozen=True)
class ShapeLossSpec:
    """A shape loss under test and the axioms it claims.

    fn: the loss, `fn(pred, target, pred_mask=None, target_mask=None) -> (N,)`; any callable but a class.
    claims: names from `CLAIMS` (default `DEFAULT_CLAIMS`, the MGIoU family's); stored as a frozenset.
    expected_failures: check name -> reason string or `headguard.ExpectedFailure`; such a check failing is xfailed.
    name: what reports call the subject; None takes the TARGET (`module:attr`) it was loaded from, else the
        function's `module:qualname`.
    """

    fn: Callable[..., torch.Tensor]
    claims: frozenset[str] = DEFAULT_CLAIMS
    expected_failures: Mapping[str, str | ExpectedFailure] = dataclasses.field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn) or isinstance(self.fn, type):
            raise TypeError(f"Expected a function (or callable instance) for fn, got fn={self.fn!r}"
                            + (" (a class: pass an instance or a function)" if isinstance(self.fn, type) else ""))
        object.__setattr__(self, "claims", _claims(self.claims))
        object.__setattr__(self, "expected_failures", _expected_failures(self.expected_failures))
        if self.name is not None and not (isinstance(self.name, str) and self.name.strip()):
            raise TypeError(f"Expected a non-empty string or None for name, got name={self.name!r}")


def _claims(claims: Any) -> frozenset[str]:
    if isinstance(claims, str) or not isinstance(claims, Iterable):
        raise TypeError(f"Expected a collection of claim names for claims, got claims={claims!r}")
    names = list(claims)
    unknown = [c for c in names if c not in CLAIMS]
    if unknown:
        raise ValueError(f"Expected claims from {sorted(CLAIMS)}, got unknown claim(s) {unknown!r} in "
                         f"claims={names!r}")
    return frozenset(names)


def _expected_failures(failures: Any) -> dict[str, ExpectedFailure]:
    if not isinstance(failures, Mapping) or not all(
        isinstance(k, str) and (isinstance(v, ExpectedFailure) or isinstance(v, str) and v.strip())
        for k, v in failures.items()
    ):
        raise TypeError(f"Expected a dict of check name -> reason (a non-empty string, or a headguard.ExpectedFailure) "
                        f"for expected_failures, got expected_failures={failures!r}")
    return {k: ExpectedFailure.of(v) for k, v in failures.items()}


@dataclasses.dataclass(frozen=True)
class ShapeLossSubject:
    """One shape loss under test: what every `shape_loss` check receives. `capabilities` are its claims."""

    kind: ClassVar[str] = "shape_loss"
    name: str
    fn: Callable[..., torch.Tensor]
    capabilities: frozenset[str]
    expected_failures: Mapping[str, ExpectedFailure]
    # The faces read these from every subject; a shape loss has no setup to report and takes the run's time limit.
    setup_notes: tuple[str, ...] = ()
    timeout: float | None = None

    @property
    def claims(self) -> frozenset[str]:
        return self.capabilities

    @property
    def description(self) -> str:
        """What the report says the subject is: a shape loss and the claims it is checked against."""
        return f"shape loss {callable_name(self.fn)}, claims {', '.join(sorted(self.claims)) or 'none'}"

    def loss(self, pred: torch.Tensor, target: torch.Tensor, pred_mask: torch.Tensor | None = None,
             target_mask: torch.Tensor | None = None) -> Any:
        """The user's function on one batch of pairs; the masks are passed only when given."""
        if pred_mask is None and target_mask is None:
            return self.fn(pred, target)
        return self.fn(pred, target, pred_mask, target_mask)


def shape_subject_from(obj: Any, *, name: str) -> ShapeLossSubject | None:
    """The subject of a ShapeLossSpec, of a plain function that takes `(pred, target, ...)` (a Python function, a
    bound method or a functools.partial; a reference loss such as `losses.mgiou` with its own claims), or the
    ShapeLossSubject itself; None for anything else. The loss is called once on an ordinary pair of squares;
    `ShapeLossError` says what it returned when that is not a (2,) tensor."""
    if isinstance(obj, ShapeLossSubject):
        return obj
    if not isinstance(obj, ShapeLossSpec):
        if not _is_plain_function(obj) or not _takes_a_pair(obj):
            return None
        obj = reference_shape_specs().get(obj) or ShapeLossSpec(obj)
    subject = ShapeLossSubject(name=_subject_name(obj, name), fn=obj.fn, capabilities=obj.claims,
                               expected_failures=obj.expected_failures)
    _validate(subject)
    return subject


def reference_shape_specs() -> Mapping[Callable, ShapeLossSpec]:
    """The reference shape losses with their claims: `losses.mgiou` also claims approximates_iou. Imported on first
    use, as `headguard.targets.reference_specs` imports the reference heads."""
    import losses

    return {losses.mgiou: ShapeLossSpec(losses.mgiou, claims=DEFAULT_CLAIMS | {"approximates_iou"})}


def _is_plain_function(obj: Any) -> bool:
    return inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, functools.partial)


def _takes_a_pair(fn: Callable) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
    except (TypeError, ValueError):  # ValueError: no signature can be read (some builtins)
        return False
    return True


def _subject_name(spec: ShapeLossSpec, given: str) -> str:
    # targets.default_name falls back to repr() for an object without a qualified name, such as a spec instance;
    # the spec's own name, or its function's module:qualname, reads better there.
    if spec.name is not None:
        return spec.name
    if given != repr(spec):
        return given
    module, qualname = getattr(spec.fn, "__module__", None), getattr(spec.fn, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(spec.fn)


# Two ordinary pairs (a unit square against itself moved by half its side, a triangle against a square), so a loss
# that collapses the batch or returns one value per vertex shows it.
_SQUARE = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
_PROBE_PRED = [_SQUARE, [[0.0, 0.0], [2.0, 0.0], [1.0, 2.0], [1.0, 2.0]]]
_PROBE_TARGET = [[[x + 0.5, y] for x, y in _SQUARE], _SQUARE]


def _validate(subject: ShapeLossSubject) -> None:
    """Call the loss once on two ordinary float32 pairs: it must return a floating tensor of shape (2,)."""
    pred, target = torch.tensor(_PROBE_PRED), torch.tensor(_PROBE_TARGET)
    expected = "a floating-point tensor of shape (N,) = (2,), one loss per pair"
    try:
        out = subject.loss(pred, target)
    except Exception as exc:  # noqa: BLE001  (whatever the loss raises on an ordinary pair is the user's error)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ShapeLossError(f"{subject.name}(pred (2, 4, 2), target (2, 4, 2)) on two ordinary pairs of float32 "
                             f"squares raised {type(exc).__name__}: {first}; expected {expected}") from None
    if not isinstance(out, torch.Tensor):
        found = f"a {type(out).__name__}"
    elif out.shape != (2,) or not out.is_floating_point():
        found = f"a {out.dtype} tensor of shape {tuple(out.shape)}"
    else:
        return
    raise ShapeLossError(f"{subject.name}(pred (2, 4, 2), target (2, 4, 2)) returned {found}; expected {expected} "
                         "(reduce over the batch outside the loss)")


__all__ = [
    "CLAIMS", "DEFAULT_CLAIMS", "ShapeLossError", "ShapeLossSpec", "ShapeLossSubject", "reference_shape_specs",
    "shape_subject_from",
]
