"""Targets that misbehave the ways real heads and losses do (copied into a temporary directory as `trustheads.py`):
each is the subject of one test in test_trust.py, which says what the runner must make of it."""

import sys
import time

import torch

import headguard
import heads
import losses


class Detect(heads.Detect):
    """The reference Detect head, to be misbehaved by subclasses."""


class HangsInEval(Detect):
    """Sleeps for an hour in the eval forward (setup runs only training forwards)."""

    def forward(self, x):
        if not self.training:
            time.sleep(3600)
        return super().forward(x)


class ExitsInEval(Detect):
    def forward(self, x):
        if not self.training:
            sys.exit(0)
        return super().forward(x)


class SetsFloat64(Detect):
    """Changes the process-wide default dtype in its constructor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.set_default_dtype(torch.float64)


class DisablesGrad(Detect):
    def forward(self, x):
        torch.set_grad_enabled(False)
        return super().forward(x)


class ReturnsList(Detect):
    """A training forward in the 8.3 style: a list of per-level maps, not the dict."""

    def forward(self, x):
        out = super().forward(x)
        return list(out["feats"]) if self.training else out


class NaNScores(Detect):
    def forward(self, x):
        out = super().forward(x)
        if self.training:
            out["scores"] = out["scores"] * float("nan")
        return out


class OutOfMemory(Detect):
    """Fails to allocate in the eval forward, as the CPU allocator reports it."""

    def forward(self, x):
        if not self.training:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1099511627776 bytes")
        return super().forward(x)


class RandomPrior(Detect):
    """Half of its initialisations shift the class bias off the configured prior, so check_class_prior passes or
    fails with the draw: a head 'near a threshold', whose verdict must still be the same for the same seed."""

    def bias_init(self, *args, **kwargs):
        super().bias_init(*args, **kwargs)
        if bool(torch.rand(()) < 0.5):
            with torch.no_grad():
                for branch in self.cv3:
                    branch[-1].bias.add_(1.0)


def scalar_loss(head):
    inner = losses.DetectionLoss.for_head(head)

    def loss(preds, batch):
        vector, _ = inner(preds, batch)
        return vector.sum()

    return loss


def tuple_items_loss(head):
    inner = losses.DetectionLoss.for_head(head)

    def loss(preds, batch):
        vector, items = inner(preds, batch)
        return vector, tuple(items.values())

    return loss


HANGS = headguard.HeadSpec(HangsInEval)
OWN_LOSS = headguard.HeadSpec(Detect, loss=losses.DetectionLoss.for_head)  # no inherited expected failures
SCALAR_LOSS = headguard.HeadSpec(Detect, loss=scalar_loss)
TUPLE_ITEMS = headguard.HeadSpec(Detect, loss=tuple_items_loss)
