"""The catalogue of checks: a registry of named properties, each gated on the capabilities it needs and declaring
what it draws. `headguard.properties.execute` runs them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from headguard import properties
from headguard.outcomes import CheckContext, CheckFailure, CheckSkipped

# Each area's checks apply to one kind of subject: a head with its loss and training step, or a standalone shape loss.
AREA_KINDS = {"head": "head", "forward": "head", "loss": "head", "training": "head", "shape_loss": "shape_loss"}
AREAS = tuple(AREA_KINDS)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fixed setting a check runs under (its values are passed to the check as keyword arguments); a check with
    several runs each as its own property, reported by `call`: `check_loss_dtype_matrix(pred=float16, ...)`."""

    values: tuple[tuple[str, Any], ...] = ()

    def call(self, name: str) -> str:
        return f"{name}({', '.join(f'{k}={readable(v)}' for k, v in self.values)})"


def readable(value: Any) -> str:
    """A variant value as a call prints it: dtypes without the `torch.` prefix."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)


def variants(**axes: Sequence[Any]) -> tuple[Variant, ...]:
    """Every combination of the axes' values, in order: `variants(pred=(a, b), target=(c,))` is (a, c), (b, c)."""
    names = list(axes)
    return tuple(Variant(tuple(zip(names, combo))) for combo in itertools.product(*axes.values()))


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    area: str
    body: Callable[..., None]
    requires: frozenset[str]
    doc: str
    # A gate is a precondition of every other check of its kind (the output contract): when it fails, the runner
    # reports the others skipped instead of running them on outputs they cannot read.
    gate: bool = False
    # What the check draws: input name -> a declared input (`headguard.strategies.Input`); `body` gets each drawn
    # value as a keyword argument. Empty: the check runs once per variant on inputs of its own.
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    # Inputs tried before the search, one dict per example naming every input (values as Input.example accepts).
    examples: tuple[Mapping[str, Any], ...] = dataclasses.field(default=(), compare=False, hash=False)
    variants: tuple[Variant, ...] = (Variant(),)
    # A costly property's example count in headguard-ci, scaled for the other profiles (None: the profile's own).
    max_examples: int | None = None

    @property
    def kind(self) -> str:
        """The kind of subject this check applies to ("head" or "shape_loss"), fixed by its area."""
        return AREA_KINDS[self.area]

    @property
    def draws(self) -> str:
        """What the check draws, in words (`headguard list`)."""
        parts = [f"{name}: {declared.describes}" for name, declared in self.inputs.items()]
        if len(self.variants) > 1:
            parts.append(f"variants: {', '.join(v.call('') for v in self.variants)}")
        return "; ".join(parts) or "fixed inputs (its docstring says why)"

    def applies_to(self, subject: Any) -> bool:
        """True for a subject of this check's kind that has every capability the check requires."""
        return subject.kind == self.kind and self.requires <= frozenset(subject.capabilities)

    def __call__(self, subject, ctx: CheckContext | None = None) -> None:
        properties.execute(self, subject, ctx or CheckContext())


CATALOGUE: dict[str, Check] = {}


def check(*, area: str, requires: Iterable[str] = (), name: str | None = None, gate: bool = False,
          inputs: Mapping[str, Any] | None = None, examples: Sequence[Mapping[str, Any]] = (),
          variants: Sequence[Variant] = (), max_examples: int | None = None):
    """Register `func(subject, ctx, **drawn, **variant)` as a check. Its name is the function name unless given;
    `gate=True` makes it a precondition of the other checks of its kind (see `Check.gate`); `inputs` are drawn for
    every example (`headguard.strategies.Input`), `examples` tried first, and the check runs once per variant."""
    if area not in AREAS:
        raise ValueError(f"Expected area in {AREAS}, got area={area!r}")
    inputs = dict(inputs or {})
    for i, chosen in enumerate(examples):
        if set(chosen) != set(inputs):
            raise ValueError(f"examples[{i}] names {sorted(chosen)}; expected every declared input {sorted(inputs)}")

    def register(func):
        key = name or func.__name__
        if key in CATALOGUE:
            raise ValueError(f"a check named {key!r} is already registered")
        doc = (func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else ""
        CATALOGUE[key] = Check(key, area, func, frozenset(requires), doc, gate, inputs, tuple(examples),
                               tuple(variants) or (Variant(),), max_examples)
        return func

    return register


def load_catalogue() -> None:
    """Register every built-in check (idempotent: the import runs once)."""
    from headguard import checks  # noqa: F401  (importing the package registers every check)


__all__ = ["AREAS", "CATALOGUE", "Check", "CheckContext", "CheckFailure", "CheckSkipped", "Variant", "check",
           "load_catalogue", "readable", "variants"]
