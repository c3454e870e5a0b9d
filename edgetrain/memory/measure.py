"""Run one tracked training step on real tensors (measure) or fake ones (predict)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from edgetrain.memory.guard import BudgetGuard
from edgetrain.memory.tracker import MemoryReport
from edgetrain.train.step import StepSettings, make_optimizer, train_step


@dataclass(frozen=True)
class StepSpec:
    """What one training step is: input shape (C, H, W), batch, classes, optimizer, settings."""

    input_shape: tuple[int, int, int]
    batch_size: int
    num_classes: int
    optimizer: str = "sgd"
    settings: StepSettings = StepSettings()


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake: shapes only, no storage."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = mode.from_tensor(b)
    return copy.deepcopy(model, memo)


def tracked_step(
    model: nn.Module,
    spec: StepSpec,
    fake: bool,
    budget_bytes: int | None = None,
    round_to: int = 1,
    warmup: bool = True,
    inplace: bool = False,
) -> MemoryReport:
    """The steady-state training step's memory: one untracked warm-up step creates optimizer
    state, then one tracked step. Works on a copy, so `model` itself is not trained, unless
    `inplace` (a real step on `model` itself: what a measuring process does to hold nothing more)."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    device = _device_of(model)
    m = fake_copy(model, mode) if fake else (model if inplace else copy.deepcopy(model))
    m.train()
    with mode:
        opt = make_optimizer(spec.optimizer, m.parameters())
        shape = (spec.batch_size, *spec.input_shape)
        x = torch.randn(shape, device=device)
        y = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)
        if warmup:
            train_step(m, x, y, opt, spec.settings)
        with BudgetGuard(budget_bytes, m, opt, (x, y), round_to) as tracker:
            train_step(m, x, y, opt, spec.settings, tracker=tracker)
        return tracker.report()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
