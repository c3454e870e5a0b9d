"""Activation checkpointing per block (`torch.utils.checkpoint`, non-reentrant).

A checkpointed block keeps only its input; backward re-runs its forward. The block's class
is swapped for a checkpointing subclass, so parameter names (and state dicts) do not change.
BatchNorm running statistics are not updated a second time by the recomputation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgetrain.methods.base import MethodConfig, MethodHandler, UnitCost, register_method, swap_class_

# Residual blocks of torchvision's and edgetrain's models: the natural checkpoint unit.
BLOCK_TYPES = ("BasicBlock", "Bottleneck", "InvertedResidual", "Conv2dNormActivation")


@dataclass(frozen=True)
class CheckpointConfig(MethodConfig):
    """Recompute each block's forward in backward instead of storing its activations."""

    name: ClassVar[str] = "checkpoint"
    risk: ClassVar[int] = 0
    help: ClassVar[str] = "recompute residual blocks in backward (exact, ~1/3 more compute)"


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """Momentum 0 for every BatchNorm inside: a re-run forward leaves running stats alone
    (and the batch counter is put back)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom, count in saved:
            m.momentum = mom
            if count is not None:
                m.num_batches_tracked.copy_(count)


class _Checkpointed:
    """Mixin put in front of a block's class: forward through `checkpoint` when training."""

    method = "checkpoint"

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)

        def contexts():
            return contextlib.nullcontext(), frozen_bn_stats(self)

        return checkpoint(super().forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class CheckpointHandler(MethodHandler):
    config_type = CheckpointConfig
    plan_scope = "unit"

    def unit_kind(self, name: str, module: nn.Module) -> str | None:
        return "block" if self.eligible(name, module, CheckpointConfig()) else None

    def candidates(self, kind: str) -> list[MethodConfig]:
        return [CheckpointConfig()] if kind == "block" else []

    def seconds(self, config: MethodConfig, unit: UnitCost) -> float:
        """A second forward of the block in backward."""
        return unit.flops / (unit.gflops * 1e9)

    def backward_transient(self, config: MethodConfig, saved_plain: int) -> int:
        """The block's activations, recomputed for its backward (a stage's: one segment's, at most all)."""
        return saved_plain

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        if type(module).__name__ in BLOCK_TYPES:
            return True
        # a plain stage of leaf layers (VGG/AlexNet `features`) with no residual block inside
        return (
            isinstance(module, nn.Sequential)
            and "." not in name
            and len(module) > 1
            and not any(type(m).__name__ in BLOCK_TYPES for m in module.modules())
            and any(isinstance(m, nn.Conv2d) for m in module)
        )

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return _checkpoint_stage(module)
        return swap_class_(module, _Checkpointed)

    def export_(self, model: nn.Module) -> list[str]:
        """Checkpointed stages run as plain `nn.Sequential` (swapped blocks are undone by the base)."""
        stages = [m for m in model.modules() if type(m) is _CheckpointedStage]
        for m in stages:
            m.__class__ = nn.Sequential
        return ["checkpoint"] if stages else []


class _CheckpointedStage(nn.Sequential):
    """A flat stage run as segments that each end after a pooling layer; each segment is
    checkpointed, so backward holds one segment's activations at a time."""

    method = "checkpoint"

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        for seg in _segments(list(self)):

            def run(t, seg=seg):
                for m in seg:
                    t = m(t)
                return t

            def contexts(seg=seg):
                return contextlib.nullcontext(), frozen_bn_stats(nn.Sequential(*seg))

            x = checkpoint(run, x, use_reentrant=False, context_fn=contexts)
        return x


def _segments(layers: list[nn.Module]) -> list[list[nn.Module]]:
    out: list[list[nn.Module]] = [[]]
    for m in layers:
        out[-1].append(m)
        if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            out.append([])
    return [s for s in out if s]


def _checkpoint_stage(stage: nn.Sequential) -> nn.Sequential:
    stage.__class__ = _CheckpointedStage
    return stage


register_method(CheckpointHandler())
