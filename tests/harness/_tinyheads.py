"""A target module as a user would write it: copied into a temporary directory as `tinyheads.py`."""

import torch
from torch import nn

import headguard


class TinyHead(nn.Module):
    """Box and class 1x1 convs per level; training dict / eval tuple like the reference heads."""

    def __init__(self, nc=80, ch=()):
        super().__init__()
        self.nc = nc
        self.cv2 = nn.ModuleList(nn.Conv2d(c, 4, 1) for c in ch)
        self.cv3 = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in ch)

    def forward(self, x):
        boxes = torch.cat([m(f).flatten(2) for m, f in zip(self.cv2, x)], 2)
        scores = torch.cat([m(f).flatten(2) for m, f in zip(self.cv3, x)], 2)
        if self.training:
            return {"boxes": boxes, "scores": scores, "feats": x}
        return torch.cat([boxes, scores.sigmoid()], 1), {"boxes": boxes, "scores": scores}


class TinyPolygonHead(TinyHead):
    """TinyHead plus a `cv4` vertex branch."""

    def __init__(self, nc=80, ch=(), np=4):
        super().__init__(nc, ch)
        self.np = np
        self.cv4 = nn.ModuleList(nn.Conv2d(c, 2 * np, 1) for c in ch)

    def forward(self, x):
        out = super().forward(x)
        polygons = torch.cat([m(f).flatten(2) for m, f in zip(self.cv4, x)], 2)
        if self.training:
            return {**out, "polygons": polygons}
        y, preds = out
        return torch.cat([y, polygons], 1), {**preds, "polygons": polygons}


class NeedsDepth(nn.Module):
    def __init__(self, depth):
        super().__init__()


def tiny_loss(head):
    def loss(preds, batch):
        value = preds["scores"].sigmoid().mean()
        return value.reshape(1), {"cls_loss": value.detach()}
    return loss


TINY = headguard.HeadSpec(head=TinyHead, loss=tiny_loss)
TINY_POLY = headguard.HeadSpec(head=TinyPolygonHead, loss=tiny_loss)
TINY_XFAIL = headguard.HeadSpec(head=TinyHead, loss=tiny_loss, expected_failures={"check_fails": "bug 17"})
TINY_STALE = headguard.HeadSpec(head=TinyHead, loss=tiny_loss,
                                expected_failures={"check_passes": "it was broken once"})
TINY_TYPO = headguard.HeadSpec(head=TinyHead, loss=tiny_loss, expected_failures={"check_pases": "typo"})
BAD_LOSS = headguard.HeadSpec(head=TinyHead, loss=42)
NOT_A_HEAD = 3
A_MODULE_INSTANCE = nn.Linear(2, 2)
NOT_A_MODULE_CLASS = dict
