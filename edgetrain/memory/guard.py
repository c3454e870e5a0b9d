"""The budget guard: make any machine behave like a device with N bytes for tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edgetrain.core.step import optimizer_state_tensors
from edgetrain.memory.tracker import MemoryTracker


def tensor_budget(profile) -> int:
    """Bytes a device leaves for a step's tensors: usable memory less the runtime workspace."""
    return profile.usable_memory_bytes - profile.workspace_bytes


def allocation_granularity(profile) -> int:
    """What one allocation costs at least: 512 B blocks under CUDA's caching allocator."""
    return 512 if profile.allocator == "cuda-caching" else 1


class BudgetGuard(MemoryTracker):
    """A tracker that raises `EdgeOOMError` as soon as live tensor bytes pass `budget_bytes`.

    The model's parameters, buffers and gradients, the optimizer's state and any `tensors`
    given count from the start, as they would on the device. `round_to=512` applies CUDA's
    allocation granularity. Use it around whole training steps:

        with BudgetGuard(profile.usable_memory_bytes, model=model, optimizer=opt):
            train_step(model, x, y, opt)
    """

    def __init__(
        self,
        budget_bytes: int | None,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        tensors: Iterable[torch.Tensor] = (),
        round_to: int = 1,
    ):
        super().__init__(budget_bytes=budget_bytes, round_to=round_to)
        self._start = (model, optimizer, list(tensors))

    def __enter__(self):
        model, optimizer, tensors = self._start
        if model is not None:
            self.track(model.parameters(), "parameters")
            self.track(model.buffers(), "parameters")
            self.track((p.grad for p in model.parameters()), "gradients")
        if optimizer is not None:
            self.track(optimizer_state_tensors(optimizer), "optimizer")
        self.track(tensors, "inputs")
        return super().__enter__()


def resting_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Tensor bytes a model holds between steps: parameters, buffers, gradients, optimizer state."""
    with BudgetGuard(None, model, optimizer) as g:
        return g.live_bytes
