"""`fresh_copy` is `copy.deepcopy` for the heads the checks build per example: equal values, nothing shared that
deepcopy would not share, aliases and hooks kept; our reference heads and Ultralytics' task heads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import heads
from headguard.cloning import fresh_copy


def _ultralytics(name):
    head = pytest.importorskip("ultralytics.nn.modules.head")
    cls = getattr(head, name)
    kwargs = {"Pose": {"kpt_shape": (17, 3)}, "OBB": {"ne": 1}, "Segment": {"nm": 8, "npr": 16}}.get(name, {})
    return cls(nc=2, ch=(16, 32, 64), **kwargs)


HEADS = {
    "Detect": lambda: heads.Detect(nc=2, ch=(16, 32, 64)),
    "Polygon": lambda: heads.Polygon(nc=2, ch=(16, 32, 64)),
    **{f"ultralytics.{n}": (lambda n=n: _ultralytics(n)) for n in ("Detect", "Segment", "Pose", "OBB")},
}


@pytest.mark.parametrize("name", HEADS)
def test_a_fresh_copy_equals_a_deep_copy_and_shares_nothing(name):
    head = HEADS[name]()
    head.stride = torch.tensor([8.0, 16.0, 32.0])
    ours, theirs = fresh_copy(head), copy.deepcopy(head)
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in head.named_parameters()]
    for (key, a), b, c in zip(ours.state_dict().items(), theirs.state_dict().values(), head.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != c.data_ptr(), key
    assert all(type(p) is nn.Parameter and p.requires_grad == q.requires_grad
               for p, q in zip(ours.parameters(), head.parameters()))
    feats = [torch.randn(2, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    torch.manual_seed(0)
    out = ours.train()(feats)
    torch.manual_seed(0)
    want = theirs.train()(feats)
    flat = lambda o: [t for t in (o.values() if isinstance(o, dict) else o) if isinstance(t, torch.Tensor)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(out), flat(want)))
    assert torch.equal(head.stride, ours.stride) and ours.stride is not head.stride


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # one parameter, two modules
        self.twice = nn.ModuleList([self.a, self.a])
        self.cache = [torch.zeros(2)]  # a mutable attribute


class _OwnCopy(nn.Module):
    def __deepcopy__(self, memo):
        return _OwnCopy()


def test_aliases_hooks_mutable_attributes_and_own_copies_are_kept_as_deepcopy_keeps_them():
    tied = _Tied()
    calls = []
    tied.a.register_forward_hook(lambda m, i, o: calls.append(1))
    new = fresh_copy(tied)
    assert new.b.weight is new.a.weight and new.a.weight is not tied.a.weight
    assert new.twice[0] is new.a and new.twice[1] is new.a
    new.cache[0] += 1
    assert tied.cache[0].sum() == 0  # not shared
    new.a(torch.zeros(1, 3))
    assert calls == [1]  # the hook was copied with its function
    holder = nn.Sequential(_OwnCopy())
    assert type(fresh_copy(holder)[0]) is _OwnCopy and fresh_copy(holder)[0] is not holder[0]
