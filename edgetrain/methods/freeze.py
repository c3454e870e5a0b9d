"""Freeze a prefix of the model for fine-tuning: no gradients, no optimizer state, and no saved
activations for it (autograd saves nothing where no input or weight needs a gradient)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.methods.base import MethodConfig, MethodHandler, register_method


@dataclass(frozen=True)
class FreezeConfig(MethodConfig):
    """Freeze the top-level children of the model up to and including `upto` (e.g. layer2)."""

    name: ClassVar[str] = "freeze"
    risk: ClassVar[int] = 1
    help: ClassVar[str] = "fine-tuning: freeze top-level layers up to `upto` (no grads, no saved activations)"
    upto: str = ""


class FreezeHandler(MethodHandler):
    config_type = FreezeConfig

    def apply_model(self, model: nn.Module, config: MethodConfig) -> None:
        upto = config.upto  # type: ignore[attr-defined]
        names = [n for n, _ in model.named_children()]
        if upto not in names:
            raise ConfigError(f"freeze: no top-level layer '{upto}'; this model has {', '.join(names)}")
        for name, child in model.named_children():
            child.requires_grad_(False)
            if name == upto:
                break


def frozen_prefix(model: nn.Module) -> list[str]:
    """Names of the top-level children whose parameters are all frozen, in order."""
    out = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


register_method(FreezeHandler())
