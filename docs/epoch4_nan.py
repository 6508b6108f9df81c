"""The epoch-4 crash (R0, issue 11) measured: every number and figure of docs/epoch4-nan.md comes from this script.

    python docs/epoch4_nan.py --out docs/figures

One reference Polygon head (nc 2, channels 16/32/64, 64 x 80 px images, batch 2) trains on one synthetic batch with
SGD (lr 0.01, momentum 0.9). Between normal steps comes one batch with a value above fp16's range in every level's
feature map, as AMP would cast it: inf. Its step is skipped, as GradScaler skips a step with non-finite gradients.
After every step an eval forward on a fixed validation batch counts the NaN outputs. Each of the team's three
shipped fixes is run alone and all together, then the cure (`headguard.training.train_step`). CPU only, seeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

import heads
import losses
from headguard import CATALOGUE, HeadSpec, build_subject
from headguard.testing import features, ordinary_targets
from headguard.plots import write_curves
from headguard.runner import run_checks
from headguard.subject import Subject
from headguard.training import DEFAULT_MAX_NORM, StepResult, train_step

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
CHECK = "check_skipped_step_leaves_model_finite"
NO_CLIPPING = math.inf


@dataclasses.dataclass(frozen=True)
class Story:
    """`before` normal steps, the step on the overflowing batch, `after` normal steps; an eval after every step."""

    before: int = 8
    after: int = 16
    image_size: tuple[int, int] = (64, 80)
    batch: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    overflow: float = 1e5  # above FP16_MAX: fp16 autocast turns it into inf before the first convolution
    seed: int = 0

    @property
    def overflow_step(self) -> int:
        return self.before


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way of training: the step, its clipping, cv4's initial final bias and the loss's NaN handling."""

    name: str  # the figure's file stem
    label: str
    step: Callable[..., StepResult]
    max_norm: float
    zero_cv4_bias: bool
    nan_to_minus_ten: bool


@dataclasses.dataclass
class Run:
    """Per-step curves of one setup, and the state after the last step."""

    setup: Setup
    loss: list[float]
    grad_norm: list[float]
    skipped: list[bool]
    nan_percent: list[float]  # NaN eval outputs after the step, in % of all outputs
    bad_buffers: list[int]  # non-finite buffers after the step
    final_bad_buffers: list[str]
    float_buffers: int  # floating-point buffers of the head (every BatchNorm's running_mean and running_var)
    eval_shape: tuple[int, ...]
    level_nan_percent: list[float]  # after the last step, per stride


# ------------------------------------------------------------------------------------------------ the team's step
def team_step(head, loss_fn, optimizer, feats, batch, *, max_norm: float = NO_CLIPPING) -> StepResult:
    """The incident's step: loss, backward, optional clipping, and GradScaler's one rule (non-finite gradients: skip
    the update). Nothing undoes what the forward pass wrote into BatchNorm's running statistics."""
    head.train()
    optimizer.zero_grad(set_to_none=True)
    preds = head(list(feats))
    try:
        vector, _items = loss_fn(preds, batch)
    except losses.LossInputError:
        # The reference loss refuses non-finite predictions (R8) where the incident's loss returned NaN, whose
        # gradients GradScaler finds non-finite: the same skip either way.
        return StepResult(loss=math.nan, grad_norm=math.nan, skipped=True)
    total = vector.sum()
    total.backward()
    # With max_norm=inf, clip_grad_norm_ only measures (its clip coefficient is capped at 1).
    grad_norm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), max_norm))
    if not math.isfinite(grad_norm):  # GradScaler's found_inf
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=float(total.detach()), grad_norm=grad_norm, skipped=True)
    optimizer.step()
    return StepResult(loss=float(total.detach()), grad_norm=grad_norm, skipped=False)


def nan_to_minus_ten(loss_fn: Callable) -> Callable:
    """Shipped fix 2 (R8): non-finite class logits replaced by -10, box and vertex outputs by 0, before the loss."""

    def masked(preds: Mapping[str, torch.Tensor], batch):
        cleaned = dict(preds)
        cleaned["scores"] = torch.nan_to_num(preds["scores"], nan=-10.0, posinf=-10.0, neginf=-10.0)
        for key in ("boxes", "polygons"):
            cleaned[key] = torch.nan_to_num(preds[key], nan=0.0, posinf=0.0, neginf=0.0)
        return loss_fn(cleaned, batch)

    return masked


SETUPS = (
    Setup("no-fix", "no fix: cv4 bias at PyTorch's default, no clipping", team_step, NO_CLIPPING, False, False),
    Setup("fix-zero-cv4-bias", "shipped fix 1: cv4's final bias set to 0", team_step, NO_CLIPPING, True, False),
    Setup("fix-nan-to-minus-10", "shipped fix 2: NaN logits -> -10 in the loss", team_step, NO_CLIPPING, False, True),
    Setup("fix-clip-10", "shipped fix 3: gradient clipping at 10", team_step, DEFAULT_MAX_NORM, False, False),
    Setup("all-three-fixes", "all three shipped fixes", team_step, DEFAULT_MAX_NORM, True, True),
    Setup("cure", "cure: headguard.training.train_step restores the skipped step's buffers", train_step,
          DEFAULT_MAX_NORM, True, False),
)


# ---------------------------------------------------------------------------------------------------- the story
def reference_subject(seed: int) -> Subject:
    """The reference Polygon head (strides set, bias_init run), initialised from `seed` without touching the
    caller's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_subject(HeadSpec(heads.Polygon), "heads.Polygon")


def default_cv4_bias(head: nn.Module, generator: torch.Generator) -> None:
    """cv4's final bias as it is when bias_init() never sets it: PyTorch's Conv2d default U(-1/sqrt(fan_in), ...)."""
    with torch.no_grad():
        for branch in head.cv4:
            conv = branch[-1]
            bound = 1.0 / math.sqrt(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
            nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


def overflowing(feats: Sequence[torch.Tensor], value: float) -> list[torch.Tensor]:
    """The maps with `value` at one position per level, cast through fp16 as autocast would: above 65504 it is inf."""
    bad = [f.clone() for f in feats]
    for f in bad:
        f[0, 0, 0, 0] = value
    return [f.to(torch.float16).to(f.dtype) for f in bad]


def nonfinite_buffers(head: nn.Module) -> list[str]:
    return [name for name, buf in head.named_buffers() if buf.is_floating_point() and not bool(buf.isfinite().all())]


def eval_outputs(head: nn.Module, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The eval-mode output y (B, 4 + nc + 2*np, A); the head goes back to train mode afterwards."""
    head.eval()
    try:
        with torch.no_grad():
            y, _ = head(list(feats))
    finally:
        head.train()
    return y


def nan_percent(y: torch.Tensor) -> float:
    return 100.0 * float(torch.isnan(y).double().mean())


def level_nan_percent(y: torch.Tensor, feats: Sequence[torch.Tensor]) -> list[float]:
    """NaN outputs per level (anchors are concatenated level by level, row-major)."""
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    return [nan_percent(part) for part in torch.split(y, sizes, dim=2)]


@dataclasses.dataclass
class Parts:
    """What one run trains: a fresh head, its loss and optimiser, the training batch and the validation maps."""

    head: nn.Module
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    feats: list[torch.Tensor]
    batch: dict[str, torch.Tensor]
    validation: list[torch.Tensor]


def training_parts(subject: Subject, story: Story) -> Parts:
    head = subject.build_head()
    return Parts(
        head=head,
        loss_fn=subject.build_loss(head),
        optimizer=torch.optim.SGD(head.parameters(), lr=story.lr, momentum=story.momentum),
        feats=features(subject, batch=story.batch, image_size=story.image_size, seed=story.seed),
        batch=ordinary_targets(subject, story.batch, seed=story.seed),
        validation=features(subject, batch=story.batch, image_size=story.image_size, seed=story.seed + 1),
    )


def run_setup(subject: Subject, setup: Setup, story: Story) -> Run:
    """Train `subject`'s head as `setup` says through `story`, with an eval after every step."""
    parts = training_parts(subject, story)
    head, feats, validation = parts.head, parts.feats, parts.validation
    if not setup.zero_cv4_bias:
        default_cv4_bias(head, torch.Generator().manual_seed(story.seed))
    loss_fn = nan_to_minus_ten(parts.loss_fn) if setup.nan_to_minus_ten else parts.loss_fn
    poisoned = overflowing(feats, story.overflow)
    run = Run(setup, [], [], [], [], [], [], [], 0, ())
    for step in range(story.before + 1 + story.after):
        inputs = poisoned if step == story.overflow_step else feats
        result = setup.step(head, loss_fn, parts.optimizer, inputs, parts.batch, max_norm=setup.max_norm)
        run.loss.append(result.loss)
        run.grad_norm.append(result.grad_norm)
        run.skipped.append(result.skipped)
        run.nan_percent.append(nan_percent(eval_outputs(head, validation)))
        run.bad_buffers.append(len(nonfinite_buffers(head)))
    run.final_bad_buffers = nonfinite_buffers(head)
    run.float_buffers = sum(1 for buf in head.buffers() if buf.is_floating_point())
    y = eval_outputs(head, validation)
    run.eval_shape = tuple(y.shape)
    run.level_nan_percent = level_nan_percent(y, validation)
    return run


def run_all(story: Story = Story(), setups: Sequence[Setup] = SETUPS) -> list[Run]:
    subject = reference_subject(story.seed)
    return [run_setup(subject, setup, story) for setup in setups]


def one_poisoned_channel(story: Story = Story()) -> tuple[float, list[float]]:
    """A healthy head (`before` reference steps), then NaN in ONE channel of the running_var of cv3[0][0][0].bn (the
    depth-wise first block of the stride-8 class branch): NaN % of the stride-8 class scores, and NaN % per level."""
    subject = reference_subject(story.seed)
    parts = training_parts(subject, story)
    for _ in range(story.before):
        train_step(parts.head, parts.loss_fn, parts.optimizer, parts.feats, parts.batch)
    with torch.no_grad():
        parts.head.cv3[0][0][0].bn.running_var[0] = math.nan
    y = eval_outputs(parts.head, parts.validation)
    stride8 = parts.validation[0].shape[2] * parts.validation[0].shape[3]
    scores = y[:, 4 : 4 + subject.nc, :stride8]
    return nan_percent(scores), level_nan_percent(y, parts.validation)


def check_messages() -> dict[str, tuple[str, str]]:
    """headguard's R0 check on the team's step and on the reference step: (status, message) each."""
    specs = {"team_step": HeadSpec(heads.Polygon, train_step=team_step), "train_step": HeadSpec(heads.Polygon)}
    out = {}
    for name, spec in specs.items():
        (result,) = run_checks(build_subject(spec, name), [CATALOGUE[CHECK]], profile="ci", seed=0)
        out[name] = (result.status, result.message or "")
    return out


# ------------------------------------------------------------------------------------------------------- output
def write_figures(runs: Sequence[Run], story: Story, out: Path) -> list[Path]:
    return [
        write_curves(
            out / f"epoch4-nan-{run.setup.name}.png",
            {
                "training loss (sum of the loss vector)": run.loss,
                "update skipped (1 = yes)": [float(s) for s in run.skipped],
                "NaN eval outputs (% of all outputs, fixed validation batch)": run.nan_percent,
                "non-finite BatchNorm buffers": [float(n) for n in run.bad_buffers],
            },
            title=f"{run.setup.label}\n(overflowing batch at step {story.overflow_step})",
        )
        for run in runs
    ]


def summary_lines(runs: Sequence[Run], story: Story) -> list[str]:
    k = story.overflow_step
    lines = [
        f"overflow value {story.overflow:g} > fp16 max {FP16_MAX:g}; overflowing batch at step {k}; "
        f"{story.before + 1 + story.after} steps; eval output y {runs[0].eval_shape} = "
        f"{math.prod(runs[0].eval_shape)} values",
        "setup                 skipped  loss[0]  loss[k-1]  loss[k]  |grad|[k]  loss[end]  NaN%[k-1]  NaN%[k]  "
        "NaN%[end]  bad buffers  NaN% per stride",
    ]
    for run in runs:
        levels = "/".join(f"{p:.1f}" for p in run.level_nan_percent)
        steps = ",".join(str(i) for i, s in enumerate(run.skipped) if s) or "-"
        lines.append(
            f"{run.setup.name:21s} {steps:>7s}  {run.loss[0]:7.4f}  {run.loss[k - 1]:9.4f}  {run.loss[k]:7.4f}  "
            f"{run.grad_norm[k]:9.4g}  {run.loss[-1]:9.4f}  "
            f"{run.nan_percent[k - 1]:9.1f}  {run.nan_percent[k]:7.1f}  {run.nan_percent[-1]:9.1f}  "
            f"{len(run.final_bad_buffers):11d}  {levels}"
        )
    poisoned = next((r for r in runs if r.final_bad_buffers), None)
    if poisoned is not None:
        bad = poisoned.final_bad_buffers
        every_bn = all(name.endswith((".bn.running_mean", ".bn.running_var")) for name in bad)
        lines.append(
            f"non-finite buffers ({poisoned.setup.name}): {len(bad)} of {poisoned.float_buffers} floating buffers"
            f"{', all BatchNorm running_mean/running_var' if every_bn else ''}, e.g. {', '.join(bad[:3])}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures (PNG) into this directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the numbers in the doc are from one thread; tiny tensors gain nothing from more
    started = time.perf_counter()
    story = Story()
    runs = run_all(story)
    print("\n".join(summary_lines(runs, story)))
    scores, levels = one_poisoned_channel(story)
    print(f"one NaN channel in cv3[0][0][0].bn.running_var: {scores:.1f} % of stride-8 class scores NaN; "
          f"NaN % of outputs per stride {'/'.join(f'{p:.1f}' for p in levels)}")
    for name, (status, message) in check_messages().items():
        print(f"{CHECK} with {name}: {status}{': ' + message if message else ''}")
    if args.out is not None:
        for path in write_figures(runs, story, args.out):
            print(f"wrote {path}")
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
