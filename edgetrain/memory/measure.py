"""Run one tracked training step on real tensors (measure) or fake ones (predict)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from edgetrain.core.packed_state import packed_state
from edgetrain.core.step import StepSpec, forward_pass, make_optimizer, train_step
from edgetrain.memory.guard import BudgetGuard
from edgetrain.memory.tracker import MemoryReport


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake: shapes only, no storage."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = mode.from_tensor(b)
    return copy.deepcopy(model, memo)


def shell_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules whose parameters and buffers share the original's storage: cheap
    (no weight is copied) for work that only changes the layers and runs fake steps, never writing
    a weight. Each parameter is a new object, so `requires_grad` set on the copy stays there."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()
    }
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def tracked_step(
    model: nn.Module,
    spec: StepSpec,
    fake: bool,
    budget_bytes: int | None = None,
    round_to: int = 1,
    warmup: bool = True,
    inplace: bool = False,
    held_batch: int | None = None,
    forward_only: bool = False,
) -> MemoryReport:
    """The steady-state training step's memory: one untracked warm-up step creates optimizer
    state, then one tracked step. Works on a copy, so `model` itself is not trained, unless
    `inplace` (a real step on `model` itself: what a measuring process does to hold nothing more).
    `held_batch`: the input is made that large and the step runs on its first `spec.batch_size`
    samples (a view: the whole input is held, as by a step that runs all of it). `forward_only`:
    the forward pass alone (one micro-batch): what it keeps, and its peak."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    device = _device_of(model)
    m = fake_copy(model, mode) if fake else (model if inplace else copy.deepcopy(model))
    m.train()
    with mode:
        opt = make_optimizer(spec.optimizer, m.parameters())
        n = held_batch or spec.batch_size
        x = torch.randn((n, *spec.input_shape), device=device)[: spec.batch_size]
        y = torch.randint(0, spec.num_classes, (n,), device=device)[: spec.batch_size]
        if warmup and fake:  # the state a steady-state step starts with, without a step of the model
            prime_optimizer(opt, spec.settings.optimizer_state)
        elif warmup:
            train_step(m, x, y, opt, spec.settings)
        with BudgetGuard(budget_bytes, m, opt, (x, y), round_to) as tracker:
            if forward_only:
                forward_pass(m, x, y, spec.settings, tracker)
            else:
                train_step(m, x, y, opt, spec.settings, tracker=tracker)
        return tracker.report()


def prime_optimizer(opt: torch.optim.Optimizer, state: str = "fp32") -> None:
    """Give `opt` the state one step makes (a zero gradient per parameter, one step; kept packed as
    `state` says): what a fake step's warm-up needs of a step, at the cost of the optimizer's ops alone."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    with packed_state(opt, state):
        opt.step()
    opt.zero_grad(set_to_none=True)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def flop_hooks(model: nn.Module, counts: dict[str, int]) -> list:
    """Forward hooks that add each conv's and linear's multiply-add FLOPs (x2) to `counts[name]`."""

    def hook(mod, inp, out, name):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            counts[name] = counts.get(name, 0) + 2 * out.numel() * k
        elif isinstance(mod, nn.Linear):
            counts[name] = counts.get(name, 0) + 2 * out.numel() * mod.in_features

    return [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip


def model_counts(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Parameters, trainable parameters, and forward FLOPs of convs and linears for one sample
    (under fake tensors: nothing is computed)."""
    mode = FakeTensorMode()
    m = fake_copy(model, mode).eval()
    counts: dict[str, int] = {}
    hooks = flop_hooks(m, counts)
    try:
        with mode, torch.no_grad():
            m(torch.empty(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "forward_flops": sum(counts.values())}  # fmt: skip
