"""Facto-CNN's partial update: of each factorized layer only one factor is trained.

A frozen factor's input gradient needs its weight only, yet autograd's conv and linear save
their input whatever needs a gradient; so a frozen factor runs as `_InputGradOnly`, which keeps
nothing but the weight, and the feature maps saved for the frozen factors go away. Biases stay
trainable (their gradient needs nothing saved). Apply after `tucker2` or `cp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from edgetrain.errors import ConfigError
from edgetrain.methods.base import MethodConfig, MethodHandler, register_method, swap_class_
from edgetrain.methods.lowrank_layers import FACTORIZED, CPConv2d

FACTORS = ("first", "core", "last")


@dataclass(frozen=True)
class PartialConfig(MethodConfig):
    """Train only `factor` (first|core|last) of each factorized layer; core falls back to last
    where a layer has none (1x1 convs, linears); a CP layer's core is its two depthwise convs."""

    name: ClassVar[str] = "partial"
    risk: ClassVar[int] = 4
    structural: ClassVar[bool] = True
    help: ClassVar[str] = "Facto-CNN: train one factor of each tucker2/cp layer (after them); frozen ones save nothing"
    factor: str = "core"

    def __post_init__(self) -> None:
        if self.factor not in FACTORS:
            raise ValueError(f"factor must be one of {', '.join(FACTORS)}, got {self.factor!r}")


def trained_parts(layer: nn.Module, factor: str) -> list[nn.Module]:
    """The sub-layers of a factorized layer that `factor` names."""
    if factor == "core" and isinstance(layer, CPConv2d):
        return [layer.vertical, layer.horizontal]
    if factor == "core" and getattr(layer, "core", None) is None:
        factor = "last"
    return [getattr(layer, factor)]


class _InputGradOnly(torch.autograd.Function):
    """conv2d/linear with a frozen weight: saves no input; backward gives the input and bias grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: nn.Module):
        ctx.save_for_backward(weight)
        ctx.layer, ctx.x_shape = layer, x.shape
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        m, needs = ctx.layer, ctx.needs_input_grad
        gx = gb = None
        if needs[0] and isinstance(m, nn.Linear):
            gx = g @ w  # (..., O) @ (O, I)
        elif needs[0]:
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, m.stride, m.padding, m.dilation, m.groups)
        if needs[2]:
            gb = g.sum(tuple(range(g.dim() - 1))) if isinstance(m, nn.Linear) else g.sum((0, 2, 3))
        return gx, None, gb, None


class _Frozen:
    """Mixin for a frozen factor: forward through `_InputGradOnly` while training."""

    method = "partial"

    def forward(self, x):
        if self.weight.requires_grad or not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return _InputGradOnly.apply(x, self.weight, self.bias, self)


class PartialHandler(MethodHandler):
    config_type = PartialConfig

    def apply_model(self, model: nn.Module, config: MethodConfig) -> None:
        layers = [m for m in model.modules() if isinstance(m, FACTORIZED)]
        if not layers:
            raise ConfigError("partial: the model has no factorized layer; put --method tucker2 (or cp) before it")
        for layer in layers:
            keep = {id(p) for part in trained_parts(layer, config.factor) for p in part.parameters()}  # type: ignore[attr-defined]
            for part in layer.children():
                trained = id(part.weight) in keep
                part.weight.requires_grad_(trained)
                if not trained and getattr(part, "padding_mode", "zeros") == "zeros":
                    swap_class_(part, _Frozen)


register_method(PartialHandler())
