"""Per-layer bit allocation for activation compression: fewer bits where they hurt least.

`layer_sensitivity` compresses one layer at a time (at `bits`) on a calibration batch and
measures how far the whole gradient moves from the plain one (relative squared error, averaged
over draws: stochastic rounding makes it a variance). `allocate_bits` then lowers bits greedily
where the added gradient noise per byte saved is least, until the average bit-width (weighted
by each layer's saved bytes) reaches the target. Quantization noise scales as 1 / (2**b - 1)**2.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgetrain.methods.base import handler_for
from edgetrain.methods.checkpoint import frozen_bn_stats
from edgetrain.methods.compress import CompressConfig

SENSITIVE_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


@contextlib.contextmanager
def _compressed(module: nn.Module, config: CompressConfig):
    cls = type(module)
    handler_for(config).apply(module, config)
    try:
        yield
    finally:
        module.__class__ = cls


def saved_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Elements each compressible layer saves (its input), from one forward pass."""
    sizes: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, inp[0].numel()))
        for name, m in model.named_modules()
        if isinstance(m, SENSITIVE_TYPES)
    ]
    try:
        with torch.no_grad(), frozen_bn_stats(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sizes


def layer_sensitivity(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int = 2, draws: int = 2
) -> dict[str, float]:
    """Relative gradient error ||g_layer - g|| ** 2 / ||g|| ** 2 with only that layer compressed."""
    model.train()
    config = CompressConfig(bits=bits)
    with frozen_bn_stats(model):
        ref = _grads(model, x, y)
        norm = ref.pow(2).sum().item() or 1.0
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, SENSITIVE_TYPES):
                with _compressed(m, config):
                    errs = [(_grads(model, x, y) - ref).pow(2).sum().item() / norm for _ in range(draws)]
                out[name] = sum(errs) / len(errs)
    model.zero_grad(set_to_none=True)
    return out


def _noise(bits: int, ref_bits: int) -> float:
    return ((2**ref_bits - 1) / (2**bits - 1)) ** 2


def allocate_bits(
    sensitivity: dict[str, float],
    sizes: dict[str, int],
    avg_bits: float,
    choices: tuple[int, ...] = (8, 4, 2),
    measured_at: int = 2,
) -> dict[str, int]:
    """Bits per layer whose size-weighted mean is <= `avg_bits`, spending noise where it is cheapest."""
    choices = tuple(sorted(choices, reverse=True))
    bits = dict.fromkeys(sensitivity, choices[0])
    total = sum(sizes.get(n, 0) for n in bits) or 1

    def mean_bits() -> float:
        return sum(bits[n] * sizes.get(n, 0) for n in bits) / total

    while mean_bits() > avg_bits:
        best, best_cost = None, float("inf")
        for n, b in bits.items():
            lower = [c for c in choices if c < b]
            if not lower or not sizes.get(n):
                continue
            added = sensitivity[n] * (_noise(lower[0], measured_at) - _noise(b, measured_at))
            cost = added / (sizes[n] * (b - lower[0]))
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        bits[best] = max(c for c in choices if c < bits[best])
    return bits
