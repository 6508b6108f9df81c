"""TARGET strings (`module:attr`) and head objects -> Subjects, with one-line errors for every way that can go wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

import heads
import losses
from headguard.adapters.ultralytics import default_spec_for
from headguard.contracts import ContractError, check_loss_contract
from headguard.errors import UsageError
from headguard.isolation import CheckTimeout, isolated_torch_state, seeded, time_limit
from headguard.reference import LOSS_FAMILIES
from headguard.shapes import ShapeLossError, shape_subject_from
from headguard.subject import DEFAULT_CHANNELS, DEFAULT_NC, ExpectedFailure, HeadSpec, Subject, build_subject

REFERENCE_TARGETS = ("heads:Detect", "heads:Polygon")
# The top-level packages a TARGET's directory could shadow: ours, imported above from where they are installed.
OWN_PACKAGES = {"heads": heads, "losses": losses, "headguard": sys.modules[__package__]}
# Above this many parameters the report warns before the run (see `size_note`).
LARGE_HEAD_PARAMETERS = 20_000_000
# How a large head scales, measured on this project's 2-core CPU with a 242 M-parameter head (ch=(4096,)*3):
# 236 s and 8.7 GB for the reference catalogue, so about 36 bytes and 1 microsecond per parameter.
BYTES_PER_PARAMETER = 36
SECONDS_PER_PARAMETER = 1e-6
# Setting a subject up (constructor, bias_init, one probe forward, one loss call) gets this long before it counts as
# hung, unless the run's time limit is longer.
SETUP_TIME_LIMIT_S = 120.0


class TargetError(UsageError):
    """A TARGET that cannot be turned into a subject. `str()` is one line, written for the user of the CLI."""


class _ConstructorFailed(Exception):
    def __init__(self, kwargs: Mapping[str, Any], error: Exception):
        super().__init__(str(error))
        self.kwargs = dict(kwargs)
        self.error = error


def resolve_target(target: str, *, seed: int = 0, timeout: float | None = None) -> Subject:
    """Import `module:attr` (the module from the current directory or sys.path) and build its subject from `seed`."""
    return subject_from(load_target(target), name=target, seed=seed, timeout=timeout)


def load_target(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"expected TARGET as module:attr (for example heads:Polygon), got {target!r}")
    cwd = os.getcwd()
    _refuse_shadowing(pathlib.Path(cwd))
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        with _attributed_import(module_name):
            module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise TargetError(f"importing module {module_name!r} (TARGET {target}) called sys.exit({exc.code!r}); guard "
                          "the module's script part with `if __name__ == \"__main__\":`") from None
    except Exception as exc:  # noqa: BLE001  (whatever the module raises on import is the user's one-line error)
        raise TargetError(f"cannot import module {module_name!r} (TARGET {target}): {_one_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r} (TARGET {target})") from None
    return obj


def _refuse_shadowing(directory: pathlib.Path) -> None:
    """A `losses.py` (or `heads/`, `headguard/`) in the TARGET's directory would replace one of our packages for the
    target's own imports; name the collision instead of failing later with "module 'losses' has no attribute ..."."""
    for name, package in OWN_PACKAGES.items():
        ours = pathlib.Path(package.__file__).resolve().parent
        for candidate in (directory / f"{name}.py", directory / name):
            if candidate.exists() and candidate.resolve() != ours:
                raise TargetError(
                    f"{candidate} shadows headguard's package {name!r} (installed at {ours}): a target importing "
                    f"{name!r} would get ours, not yours; rename yours or run headguard from another directory"
                )


class _Attributed(io.TextIOBase):
    """A text stream that prefixes each line written to it with the module that wrote it."""

    def __init__(self, stream, label: str):
        self.stream, self.label, self.at_line_start = stream, label, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(f"[{self.label}] ")
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _attributed_import(module_name: str) -> Iterator[None]:
    """While a target module is imported: what it prints goes to stderr marked `[import module]`, and `sys.argv` is
    just its own name, so a module that parses arguments at import sees none of headguard's."""
    label = f"import {module_name}"
    saved = sys.argv, sys.stdout
    sys.argv = [module_name]
    sys.stdout = _Attributed(sys.stderr, label)
    stderr = sys.stderr
    sys.stderr = _Attributed(stderr, label)
    try:
        yield
    finally:
        sys.stdout.flush()
        (sys.argv, sys.stdout), sys.stderr = saved, stderr


def subject_from(obj: Any, *, name: str | None = None, seed: int = 0, timeout: float | None = None) -> Subject:
    """A Subject from a head class, a HeadSpec or a Subject, built from `seed` (its weights included, so the same
    seed gives the same subject in every process). A class listed in `headguard.reference.REFERENCE_SPECS` uses that
    spec (with its expected failures). `timeout` bounds the setup when it is longer than `SETUP_TIME_LIMIT_S`."""
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
    return _build(spec, name, seed=seed, time_limit_s=max(SETUP_TIME_LIMIT_S, timeout or 0.0))


def spec_for(obj: Any, *, name: str) -> HeadSpec:
    if isinstance(obj, HeadSpec):
        return obj
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        # Ultralytics' own task heads get their own task loss; ultralytics itself is imported only for them.
        return reference_specs().get(obj) or default_spec_for(obj) or HeadSpec(head=obj)
    raise TargetError(f"{name} is {_describe(obj)}, not a subject: expected a head (an nn.Module subclass or a "
                      "headguard.HeadSpec) or a shape loss (fn(pred, target, ...) or a headguard.ShapeLossSpec)")


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
    for field in ("head", "loss", "train_step", "detection_loss"):
        value = getattr(spec, field)
        if (value is not None or field == "head") and not callable(value):
            raise TargetError(f"{name} has {field}={value!r}, which is not callable; expected "
                              f"{_FIELD_DOCS[field]}")
    failures = spec.expected_failures
    if not isinstance(failures, Mapping) or not all(
        isinstance(k, str) and (isinstance(v, ExpectedFailure) or isinstance(v, str) and v.strip())
        for k, v in failures.items()
    ):
        raise TargetError(f"{name} has expected_failures={failures!r}; expected a dict of check name -> reason "
                          "(a non-empty string, or a headguard.ExpectedFailure)")
    names = spec.item_names
    if names is not None and not (isinstance(names, (tuple, list)) and names and all(isinstance(n, str) for n in names)):
        raise TargetError(f"{name} has item_names={names!r}; expected a tuple of item names, or None")
    if spec.loss_family is not None and spec.loss_family not in LOSS_FAMILIES:
        raise TargetError(f"{name} has loss_family={spec.loss_family!r}; expected one of {sorted(LOSS_FAMILIES)}")
    if spec.timeout is not None and not (isinstance(spec.timeout, (int, float)) and spec.timeout > 0):
        raise TargetError(f"{name} has timeout={spec.timeout!r}; expected a positive number of seconds, or None")


_FIELD_DOCS = {
    "head": "the head class, or a callable returning an nn.Module",
    "loss": "a callable that takes the built head and returns the criterion",
    "train_step": "a callable with the signature of headguard.training.train_step",
    "detection_loss": "a callable that takes the built head and returns its family's detection criterion",
}


def _build(spec: HeadSpec, name: str, *, seed: int, time_limit_s: float) -> Subject:
    """Build the subject from `seed` with global torch state isolated, and check its loss contract. What the
    constructor changes in global state is undone as soon as it returns, so the rest of the setup (bias_init, the
    probe forward, the loss call) runs as the checks will."""
    changed: list[str] = []
    try:
        with seeded(seed) as setup_changes, time_limit(time_limit_s):
            subject = _construct(spec, name, changed)
            subject.seed = seed
            check_loss_contract(subject)
    except CheckTimeout as exc:
        raise TargetError(f"{name}: setting up the subject (constructor, bias_init(), one forward pass, one loss call) "
                          f"{exc}") from None
    except ContractError as exc:
        raise TargetError(f"{name}: {exc}") from None
    except SystemExit as exc:
        raise TargetError(f"{name}: setting up the subject called sys.exit({exc.code!r}); a head or loss must raise "
                          "an exception, never exit the process") from None
    notes = [size_note(subject)] if subject.parameter_count > LARGE_HEAD_PARAMETERS else []
    changed += [c for c in setup_changes if c not in changed]
    if changed:
        notes.append(f"setting up {name} changed global torch state ({'; '.join(changed)}); headguard restored it "
                     "before running the checks: a head must not change process-wide settings")
    subject.setup_notes = tuple(notes)
    return subject


def size_note(subject: Subject) -> str:
    """A warning, with an estimate, for a head large enough to make the run slow and memory-hungry."""
    count = subject.parameter_count
    return (f"{subject.name} has {count / 1e6:.0f} M parameters: expect roughly "
            f"{count * BYTES_PER_PARAMETER / 1e9:.1f} GB of memory and {count * SECONDS_PER_PARAMETER:.0f} s for the "
            "catalogue; the checks need only the head's structure, so pass small channels with "
            "HeadSpec(head_kwargs={'ch': (16, 32, 64)})")


def _construct(spec: HeadSpec, name: str, changed: list[str]) -> Subject:
    """`build_subject` with the head's constructor run isolated; `changed` collects the global state it changed."""

    def construct(**kwargs: Any) -> nn.Module:
        try:
            with isolated_torch_state(generators=False) as changes:
                head = spec.head(**kwargs)
            changed.extend(changes)
            return head
        except Exception as exc:  # noqa: BLE001  (reported as the constructor's error, see below)
            raise _ConstructorFailed(kwargs, exc) from exc

    try:
        return build_subject(dataclasses.replace(spec, head=construct), name)
    except _ConstructorFailed as failed:
        call = f"{_head_label(spec, name)}({', '.join(f'{k}={v!r}' for k, v in failed.kwargs.items())})"
        hint = _ultralytics_parent_hint(spec.head) or ""
        if isinstance(failed.error, TypeError) and not hint:
            hint = "; a head must accept nc and ch, or use HeadSpec(head_kwargs=...)"
        raise TargetError(f"{call} raised {_one_line(failed.error)}{hint}") from None
    except Exception as exc:  # noqa: BLE001
        raise TargetError(
            f"{name}: setting up the subject (bias_init(), one forward pass with nc={DEFAULT_NC}, "
            f"ch={DEFAULT_CHANNELS} unless head_kwargs say otherwise, choosing the loss) raised {_one_line(exc)}"
        ) from None


def _ultralytics_parent_hint(head: Any) -> str | None:
    """For a subclass of an Ultralytics head: the installed version and its parent's signature, since the parents'
    signatures changed between releases (8.4's Detect takes reg_max and end2end before ch, 8.3's did not)."""
    parent = next((c for c in getattr(head, "__mro__", ())[1:] if c.__module__.startswith("ultralytics.")), None)
    if parent is None:
        return None
    version = getattr(sys.modules.get("ultralytics"), "__version__", "?")
    return (f"; its parent {parent.__module__}.{parent.__qualname__} in the installed Ultralytics {version} has "
            f"the signature {parent.__qualname__}{inspect.signature(parent.__init__)}: a head written for another "
            "release may pass its arguments in the wrong places (call super().__init__ with keywords)")


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
