"""TARGET strings (`module:attr`) and head objects -> Subjects, with one-line errors for every way that can go wrong."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from headguard.shapes import ShapeLossError, shape_subject_from
from headguard.subject import DEFAULT_CHANNELS, DEFAULT_NC, HeadSpec, Subject, build_subject

REFERENCE_TARGETS = ("heads:Detect", "heads:Polygon")


class TargetError(Exception):
    """A TARGET that cannot be turned into a subject. `str()` is one line, written for the user of the CLI."""


class _ConstructorFailed(Exception):
    def __init__(self, kwargs: Mapping[str, Any], error: Exception):
        super().__init__(str(error))
        self.kwargs = dict(kwargs)
        self.error = error


def resolve_target(target: str) -> Subject:
    """Import `module:attr` (the module from the current directory or sys.path) and build its subject."""
    return subject_from(load_target(target), name=target)


def load_target(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"expected TARGET as module:attr (for example heads:Polygon), got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (whatever the module raises on import is the user's one-line error)
        raise TargetError(f"cannot import module {module_name!r} (TARGET {target}): {_one_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r} (TARGET {target})") from None
    return obj


def subject_from(obj: Any, *, name: str | None = None) -> Subject:
    """A Subject from a head class, a HeadSpec or a Subject. A class listed in `headguard.reference.REFERENCE_SPECS`
    uses that spec (with its expected failures)."""
    if isinstance(obj, Subject):
        return obj
    try:  # a standalone shape loss (a function, a headguard.ShapeLossSpec) is a subject of its own kind
        shape = shape_subject_from(obj, name=name or default_name(obj))
    except ShapeLossError as exc:
        raise TargetError(str(exc)) from None
    if shape is not None:
        return shape
    name = name or default_name(obj)
    spec = spec_for(obj, name=name)
    _validate_spec(spec, name)
    return _build(spec, name)


def spec_for(obj: Any, *, name: str) -> HeadSpec:
    if isinstance(obj, HeadSpec):
        return obj
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return reference_specs().get(obj) or HeadSpec(head=obj)
    raise TargetError(f"{name} is {_describe(obj)}, not a head: expected an nn.Module subclass or a headguard.HeadSpec")


def reference_specs() -> Mapping[type, HeadSpec]:
    """`headguard.reference.REFERENCE_SPECS`, imported on first use (it imports the reference heads). No ImportError
    fallback: a broken `heads`/`losses` must surface, not quietly drop the reference's expected failures."""
    from headguard.reference import REFERENCE_SPECS

    return REFERENCE_SPECS


def default_name(obj: Any) -> str:
    """`module:qualname` of the head class, so that the reproduce command can be pasted."""
    head = obj.head if isinstance(obj, HeadSpec) else obj
    module, qualname = getattr(head, "__module__", None), getattr(head, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(obj)


def short_name(subject: Subject) -> str:
    """`Detect` for `heads:Detect`: the readable part of pytest ids."""
    return subject.name.rpartition(":")[2].rpartition(".")[2] or subject.name


def _validate_spec(spec: HeadSpec, name: str) -> None:
    for field in ("head", "loss", "train_step"):
        value = getattr(spec, field)
        if (value is not None or field == "head") and not callable(value):
            raise TargetError(f"{name} has {field}={value!r}, which is not callable; expected "
                              f"{_FIELD_DOCS[field]}")
    failures = spec.expected_failures
    if not isinstance(failures, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in failures.items()
    ):
        raise TargetError(f"{name} has expected_failures={failures!r}; expected a dict of check name -> reason "
                          "(a non-empty string)")


_FIELD_DOCS = {
    "head": "the head class, or a callable returning an nn.Module",
    "loss": "a callable that takes the built head and returns the criterion",
    "train_step": "a callable with the signature of headguard.training.train_step",
}


def _build(spec: HeadSpec, name: str) -> Subject:
    def construct(**kwargs: Any) -> nn.Module:
        try:
            return spec.head(**kwargs)
        except Exception as exc:  # noqa: BLE001  (reported as the constructor's error, see below)
            raise _ConstructorFailed(kwargs, exc) from exc

    try:
        return build_subject(dataclasses.replace(spec, head=construct), name)
    except _ConstructorFailed as failed:
        call = f"{_head_label(spec, name)}({', '.join(f'{k}={v!r}' for k, v in failed.kwargs.items())})"
        hint = ""
        if isinstance(failed.error, TypeError):
            hint = "; a head must accept nc and ch, or use HeadSpec(head_kwargs=...)"
        raise TargetError(f"{call} raised {_one_line(failed.error)}{hint}") from None
    except Exception as exc:  # noqa: BLE001
        raise TargetError(
            f"{name}: setting up the subject (bias_init(), one forward pass with nc={DEFAULT_NC}, "
            f"ch={DEFAULT_CHANNELS} unless head_kwargs say otherwise, choosing the loss) raised {_one_line(exc)}"
        ) from None


def _head_label(spec: HeadSpec, name: str) -> str:
    head_name = getattr(spec.head, "__qualname__", None) or repr(spec.head)
    return name if name.rpartition(":")[2] == head_name else f"{name} (head {head_name})"


def _describe(obj: Any) -> str:
    if isinstance(obj, nn.Module):
        return f"an instance of {type(obj).__name__} (pass the class, or a HeadSpec whose head builds it)"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}, which is not an nn.Module subclass"
    kind = type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
