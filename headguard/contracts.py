"""The loss contract, checked once when a subject is set up: a criterion that returns the wrong kind of thing is one
usage error naming what it returned, not a dozen errors raised from inside the checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from headguard.testing import features, ordinary_targets
from headguard.errors import UsageError
from headguard.layouts import LayoutMismatch
from headguard.subject import Subject

LOSS_CONTRACT = (
    "criterion(preds, batch) -> (loss_vector, items): loss_vector a floating torch.Tensor of one or more elements that "
    "carries a gradient, items a mapping of item name -> number or 0-d tensor"
)


class ContractError(UsageError):
    """A subject whose loss does not keep the loss contract; `str()` says what it returned and what is expected."""


def check_loss_contract(subject: Subject) -> None:
    """Call the subject's criterion once, on an ordinary batch and on finite stand-in predictions shaped as the head's
    training output, and check the shape of its result. Stand-ins, not the head's own values: a head whose output is
    NaN is a finding of the checks, not a misuse. A head whose training output does not fit its layout is left to
    `check_output_contract`, which gates every check that reads outputs."""
    head = subject.build_head()
    with torch.no_grad():
        out = head(features(subject, batch=2))
    try:
        preds = subject.train_outputs(out)
    except LayoutMismatch:
        return
    generator = torch.Generator().manual_seed(subject.seed)
    preds = {k: _stand_in(v, generator) for k, v in preds.items()}
    batch = ordinary_targets(subject, 2, seed=subject.seed)
    criterion = subject.build_loss(head)
    result = _call(criterion, preds, batch)
    names = getattr(criterion, "loss_names", None)
    if _unnamed_items(result) and subject.item_names is None and names is not None:
        subject.item_names = tuple(names)  # a loss that names its items itself (loss_names), as 8.3's trainers read
        result = _call(subject.build_loss(head), preds, batch)
    problem = _loss_result_problem(result)
    if problem:
        raise ContractError(f"the loss returned {problem}; expected {LOSS_CONTRACT}")


def _call(criterion, preds, batch) -> Any:
    try:
        return criterion(preds, batch)
    except Exception as exc:  # noqa: BLE001  (any error here is the one usage error, named)
        raise ContractError(f"the loss raised {type(exc).__name__} on an ordinary batch at setup: {_first_line(exc)}; "
                            f"expected {LOSS_CONTRACT}") from exc


def _unnamed_items(result: Any) -> bool:
    return isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], (torch.Tensor, tuple, list))


def _stand_in(value: Any, generator: torch.Generator) -> Any:
    """Standard-normal values of a float tensor's shape and dtype, as a leaf that takes gradients."""
    if not _is_float_tensor(value):
        return value
    sample = torch.randn(value.shape, generator=generator, dtype=torch.float32)
    return sample.to(value.dtype).requires_grad_(True)


def _loss_result_problem(result: Any) -> str | None:
    if not (isinstance(result, tuple) and len(result) == 2):
        return _describe(result)
    vector, items = result
    if not _is_float_tensor(vector) or vector.ndim > 1 or vector.numel() == 0:
        return f"({_describe(vector)}, ...) as its loss vector"
    if not vector.requires_grad:
        return "a loss vector with no gradient (detached, or computed under no_grad)"
    if not isinstance(items, Mapping):
        hint = "; name them with HeadSpec(item_names=(...))" if isinstance(items, (torch.Tensor, tuple, list)) else ""
        return f"(vector, {_describe(items)}) as its items{hint}"
    bad = [k for k, v in items.items() if not isinstance(k, str) or not _is_number(v)]
    if bad:
        return f"items whose entries {bad!r} are not name -> number"
    return None


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
