"""The reference training step: autocast, clipping, and skipping non-finite updates without poisoning buffers (R0)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

DEFAULT_MAX_NORM = 10.0


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did. `loss` is the summed loss vector; `grad_norm` the total gradient norm before clipping
    (NaN when the forward pass already produced a non-finite value); `skipped` means nothing was updated."""

    loss: float
    grad_norm: float
    skipped: bool


def train_step(
    head: nn.Module,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    feats: Sequence[torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    max_norm: float = DEFAULT_MAX_NORM,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    """One optimisation step of `head` on `feats`/`batch`.

    A step whose predictions, loss or gradients are non-finite is skipped: parameters are left alone and every buffer
    the forward pass touched (BatchNorm running statistics, `num_batches_tracked`) is restored. Without that
    restore, eval mode later reads the poisoned statistics and returns NaN everywhere (R0); clipping cannot help.
    """
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"Expected a finite max_norm > 0, got max_norm={max_norm!r}")
    head.train()
    saved = _snapshot_buffers(head)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(feats, autocast_dtype):
        preds = head(list(feats))
        if not all_finite(preds):
            # The loss rejects non-finite predictions (R8); the forward already wrote its statistics, so undo them.
            return _skip(head, optimizer, saved, loss=math.nan, grad_norm=math.nan)
        vector, _items = loss_fn(preds, batch)
        total = vector.sum()
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in head.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    loss = float(total.detach())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        if scaler is not None:
            scaler.update()  # lowers the scale, as a skipped AMP step should
        return _skip(head, optimizer, saved, loss=loss, grad_norm=grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=False)


def _skip(head, optimizer, saved, *, loss: float, grad_norm: float) -> StepResult:
    _restore_buffers(head, saved)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=True)


def _snapshot_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in module.named_buffers()}


def _restore_buffers(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(saved[name])


def all_finite(obj) -> bool:
    """True when every floating tensor in `obj` (a tensor, or mappings/sequences of them) is finite."""
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, Mapping):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def _autocast(feats: Sequence[torch.Tensor], dtype: torch.dtype | None):
    """bf16 autocast on CPU, fp16/bf16 on CUDA; fp16 on CPU is refused rather than silently run in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    device_type = feats[0].device.type
    if device_type == "cpu" and dtype != torch.bfloat16:
        raise ValueError(f"Expected autocast_dtype=torch.bfloat16 on CPU, got autocast_dtype={dtype}")
    return torch.autocast(device_type=device_type, dtype=dtype)
