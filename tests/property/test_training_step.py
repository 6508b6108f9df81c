"""headguard.training.train_step: restores buffers when it skips (R0), clips the update, reports what it did."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import heads
from headguard.subject import HeadSpec, build_subject
from headguard.training import StepResult, train_step


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: threads only contend
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def subject():
    return build_subject(HeadSpec(heads.Detect), "Detect")


def _inputs(subject, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(s, generator=gen) for s in subject.feature_shapes((64, 64), batch)]
    targets = {
        "batch_idx": torch.arange(batch).float(),
        "cls": torch.zeros(batch, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]]).repeat(batch, 1),
    }
    return feats, targets


def _state(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan, 3e38])
def test_non_finite_forward_is_skipped_and_every_buffer_restored(subject, poison):
    head = subject.build_head()
    feats, batch = _inputs(subject)
    feats[0][0, 0, 0, 0] = poison
    if poison == 3e38:  # finite input whose activations overflow: the whole first level at 3e38
        feats[0] = feats[0].abs() * poison
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    before = _state(head)
    result = train_step(head, subject.build_loss(head), opt, feats, batch)
    assert result.skipped
    _assert_same(_state(head), before)  # parameters AND running_mean/var/num_batches_tracked
    assert all(p.grad is None for p in head.parameters())


def test_a_normal_step_updates_buffers_and_parameters(subject):
    head = subject.build_head()
    feats, batch = _inputs(subject)
    before = _state(head)
    result = train_step(head, subject.build_loss(head), torch.optim.SGD(head.parameters(), lr=0.01), feats, batch)
    assert not result.skipped and math.isfinite(result.loss) and result.grad_norm > 0
    after = _state(head)
    assert not torch.equal(after["cv2.0.0.bn.running_mean"], before["cv2.0.0.bn.running_mean"])
    assert int(after["cv2.0.0.bn.num_batches_tracked"]) == int(before["cv2.0.0.bn.num_batches_tracked"]) + 1
    assert not torch.equal(after["cv3.0.2.bias"], before["cv3.0.2.bias"])


@settings(max_examples=8)
@given(
    lr=st.sampled_from([1e-3, 0.1, 1.0]),
    max_norm=st.sampled_from([1e-4, 1e-2, 1.0, 10.0, 1e3]),
    seed=st.integers(0, 3),
)
def test_update_is_bounded_by_lr_times_max_norm(subject, lr, max_norm, seed):
    head = subject.build_head()
    feats, batch = _inputs(subject, seed)
    before = [p.detach().clone() for p in head.parameters()]
    result = train_step(head, subject.build_loss(head), torch.optim.SGD(head.parameters(), lr=lr), feats, batch,
                        max_norm=max_norm)
    moved = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(head.parameters(), before)))
    assert not result.skipped
    assert moved <= lr * min(max_norm, result.grad_norm) * (1 + 1e-3) + 1e-7
    # The reported norm is the pre-clip total, so an unclipped step moves by exactly lr * grad_norm.
    if result.grad_norm <= max_norm:
        assert moved == pytest.approx(lr * result.grad_norm, rel=1e-3)


def test_non_finite_gradients_with_finite_loss_are_skipped(subject):
    head = subject.build_head()
    feats, batch = _inputs(subject)
    loss = subject.build_loss(head)

    def nan_gradients(preds, batch_):
        vector, items = loss(preds, batch_)
        return vector + torch.sqrt(preds["scores"].sum() * 0.0), items  # d sqrt(0) = inf, times 0: NaN

    before = _state(head)
    result = train_step(head, nan_gradients, torch.optim.SGD(head.parameters(), lr=0.1), feats, batch)
    assert result.skipped and math.isfinite(result.loss) and math.isnan(result.grad_norm)
    _assert_same(_state(head), before)


def test_bf16_autocast_on_cpu_runs_and_fp16_on_cpu_is_refused(subject):
    head = subject.build_head()
    feats, batch = _inputs(subject)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    result = train_step(head, subject.build_loss(head), opt, feats, batch, autocast_dtype=torch.bfloat16)
    assert isinstance(result, StepResult) and not result.skipped and math.isfinite(result.loss)
    with pytest.raises(ValueError, match="autocast_dtype=torch.bfloat16 on CPU"):
        train_step(head, subject.build_loss(head), opt, feats, batch, autocast_dtype=torch.float16)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
def test_bad_max_norm_is_rejected(subject, max_norm):
    head = subject.build_head()
    feats, batch = _inputs(subject)
    with pytest.raises(ValueError, match="max_norm"):
        train_step(head, subject.build_loss(head), torch.optim.SGD(head.parameters(), lr=0.01), feats, batch,
                   max_norm=max_norm)


@pytest.mark.cuda
def test_fp16_grad_scaler_skip_restores_buffers_on_cuda(subject):
    head = subject.build_head().cuda()
    feats, batch = _inputs(subject)
    feats = [f.cuda() for f in feats]
    batch = {k: v.cuda() for k, v in batch.items()}
    feats[0] = feats[0].abs() * 1e5  # above fp16's 65504 before the first BatchNorm
    scaler = torch.amp.GradScaler("cuda")
    before = _state(head)
    result = train_step(head, subject.build_loss(head), torch.optim.SGD(head.parameters(), lr=0.01), feats, batch,
                        scaler=scaler, autocast_dtype=torch.float16)
    assert result.skipped
    _assert_same(_state(head), before)


@pytest.mark.cuda
def test_fp16_grad_scaler_steps_restore_state_whenever_skipped_on_cuda(subject):
    """Ordinary steps under fp16 autocast with a GradScaler: a step the scaler skips (gradient overflow at the initial
    scale) leaves parameters and buffers exactly as they were, and the run ends with finite state."""
    head = subject.build_head().cuda()
    feats, batch = _inputs(subject)
    feats = [f.cuda() for f in feats]
    batch = {k: v.cuda() for k, v in batch.items()}
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)  # large enough that the first steps overflow
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    outcomes = []
    for _ in range(12):
        before = _state(head)
        result = train_step(head, subject.build_loss(head), opt, feats, batch, scaler=scaler,
                            autocast_dtype=torch.float16)
        outcomes.append(result.skipped)
        if result.skipped:
            _assert_same(_state(head), before)
    assert any(outcomes) and not outcomes[-1], outcomes
    assert all(bool(torch.isfinite(v).all()) for v in head.state_dict().values() if v.is_floating_point())
