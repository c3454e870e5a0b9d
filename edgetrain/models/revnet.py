"""A reversible CNN for CIFAR-sized inputs, after Hascoet et al. (2019)'s minimal-memory design.

stem conv (3 -> C, its small input stored) · stage 1: n couplings at C channels ·
space-to-depth (4C, H/2) · stage 2 · space-to-depth (16C, H/4) · stage 3 · pool · linear.
Everything between the stem and the pool is one `ReversibleSequence`: its activations are
the chain's output alone, whatever the depth; the residual functions' hidden width stays
moderate (`hidden`), so compute grows slower than the channels.
"""

from __future__ import annotations

from torch import nn

from edgetrain.methods.reversible import Coupling, InvDownsample, ReversibleSequence, residual_fn
from edgetrain.models import register_model


class RevNet(nn.Module):
    def __init__(self, depth: int = 2, width: int = 16, hidden: tuple[int, ...] = (8, 32, 64), num_classes: int = 10,
                 dropout: float = 0.0, reversible: bool = True):  # fmt: skip
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c = width
        for stage, h in enumerate(hidden):
            if stage:
                blocks.append(InvDownsample())
                c *= 4
            blocks += [Coupling(residual_fn(c // 2, h, dropout), residual_fn(c // 2, h, dropout)) for _ in range(depth)]
        self.body = ReversibleSequence(blocks, enabled=reversible)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)
        )

    def forward(self, x):  # (N, 3, H, W) -> (N, K)
        return self.head(self.body(self.stem(x)))


@register_model
def revnet(num_classes: int = 10) -> nn.Module:
    return RevNet(depth=2, num_classes=num_classes)


@register_model
def revnet_deep(num_classes: int = 10) -> nn.Module:
    return RevNet(depth=4, num_classes=num_classes)


@register_model
def revnet_stored(num_classes: int = 10) -> nn.Module:
    """`revnet` with its activations stored by autograd: the same network, the usual memory."""
    return RevNet(depth=2, num_classes=num_classes, reversible=False)
