"""The low-rank methods `tucker2` and `cp`: configs and handlers that put low-rank layers
(methods/lowrank_layers.py) in place of trained or fresh `nn.Conv2d`/`nn.Linear`, converted by
methods/decompose.py.

`tucker2`: 1x1 (C -> r_in) . kxk (r_in -> r_out, the original's stride/padding/dilation/groups)
. 1x1 (r_out -> C'); a 1x1 conv or a linear layer becomes U·V. `cp`: 1x1 (C -> R) . kx1
depthwise . 1xk depthwise . 1x1 (R -> C'); with `refuse` (either method) the chain runs as one
autograd Function that keeps less and recomputes the cheap intermediates (methods/refusion.py). Weights are decomposed from the layer's current values
(`init=decompose`, a conversion) or drawn fresh (`init=random`, training from scratch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from edgetrain.core.step import StepSettings
from edgetrain.errors import ConfigError
from edgetrain.methods.base import MethodConfig, MethodHandler, apply_method_, register_alias, register_method
from edgetrain.methods.decompose import (
    MIN_CHANNELS,
    RankRule,
    conversion_report,
    cp_conv,
    factored_params,
    lowrank_linear,
    tucker2_conv,
)  # fmt: skip
from edgetrain.methods.lowrank_layers import FACTORIZED, CPConv2d, LowRankLinear, Tucker2Conv2d, resize_to_


@dataclass(frozen=True)
class Tucker2Config(RankRule):
    """Tucker-2 convs and U·V linears; `als` HOOI sweeps after HOSVD; `reg` an ELRT orthogonality
    regularizer on the factor matrices (none|so|dso|srip|mc) added to the loss with `reg_weight`;
    `refuse` runs each chain as one Function that recomputes the first 1x1's output in backward."""

    name: ClassVar[str] = "tucker2"
    structural: ClassVar[bool] = True
    help: ClassVar[str] = "Tucker-2 conv / U·V linear (ELRT): fewer FLOPs and params; optional orthogonality reg"
    als: int = 0
    reg: str = "none"
    reg_weight: float = 1e-3
    refuse: bool = False

    @property
    def risk(self) -> int:  # type: ignore[override]
        """5 at half the FLOPs or more, one more below a half and below a fifth: fewer ranks, more loss."""
        return 5 + (self.ratio < 0.5) + (self.ratio < 0.2) if not (self.rank or self.energy) else 5

    def __post_init__(self) -> None:
        super().__post_init__()
        from edgetrain.methods.orthogonality import REGULARIZERS

        if self.reg != "none" and self.reg not in REGULARIZERS:
            raise ValueError(f"reg must be none or one of {', '.join(REGULARIZERS)}, got {self.reg!r}")
        if self.als < 0 or self.reg_weight < 0:
            raise ValueError("als and reg_weight must be >= 0")


@dataclass(frozen=True)
class CPConfig(RankRule):
    """CP convs (T1000's chain) by ALS (`iters` sweeps); `refuse` recomputes the depthwise
    intermediates in backward (`recompute=all`: the first 1x1 too, keeping only the input)."""

    name: ClassVar[str] = "cp"
    risk: ClassVar[int] = 6
    structural: ClassVar[bool] = True
    help: ClassVar[str] = "CP conv 1x1.kx1dw.1xkdw.1x1 (T1000) by ALS; refuse=true recomputes the intermediates"
    iters: int = 25
    refuse: bool = False
    recompute: str = "depthwise"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recompute not in ("depthwise", "all"):
            raise ValueError(f"recompute must be depthwise or all, got {self.recompute!r}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


class _LowRankHandler(MethodHandler):
    def export_(self, model: nn.Module) -> list[str]:
        """Re-fused chains run as their plain convs (traceable)."""
        off = []
        for m in model.modules():
            if isinstance(m, Tucker2Conv2d | CPConv2d) and m.refuse:
                m.refuse = False
                off.append("tucker2 refuse" if isinstance(m, Tucker2Conv2d) else "cp refuse")
        return off

    def apply_model(self, model: nn.Module, config: MethodConfig) -> None:
        """The classifier (the last conv or linear) stays dense: its rank is the class count."""
        last = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and not _is_factor(m)]
        if last:
            last[-1]._keep_dense = True
        if config.budget and not config.rank and not config.energy:  # type: ignore[attr-defined]
            ratio = ratio_for_budget(model, config, self)  # type: ignore[arg-type]
            apply_method_(model, dataclasses.replace(config, ratio=ratio, budget=0.0))

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        if _is_factor(module) or getattr(module, "_keep_dense", False) or config.budget:  # type: ignore[attr-defined]
            return False
        if isinstance(module, nn.Linear):
            return isinstance(config, Tucker2Config) and min(module.in_features, module.out_features) >= MIN_CHANNELS
        if not isinstance(module, nn.Conv2d) or isinstance(module.padding, str):
            return False
        per_group = min(module.in_channels, module.out_channels) // module.groups
        return per_group >= MIN_CHANNELS and (isinstance(config, Tucker2Config) or _cp_ok(module))


def ratio_for_budget(model: nn.Module, c: RankRule, handler: _LowRankHandler) -> float:
    """The per-layer FLOP ratio whose factorized model keeps `c.budget` of the parameters (bisection)."""
    mods = [m for n, m in model.named_modules() if handler.eligible(n, m, dataclasses.replace(c, budget=0.0))]
    total = sum(p.numel() for p in model.parameters())
    dense = total - sum(m.weight.numel() for m in mods)

    def kept(ratio: float) -> float:
        rc = dataclasses.replace(c, ratio=ratio, budget=0.0)
        return (dense + sum(factored_params(m, rc) for m in mods)) / total

    if kept(1e-3) > c.budget:
        raise ConfigError(f"{c.name}: a budget of {c.budget:.1%} of the parameters cannot be met: the layers that "
                          f"stay dense and the smallest ranks keep {kept(1e-3):.1%}; give a larger budget")  # fmt: skip
    lo, hi = 1e-3, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) <= c.budget else (lo, mid)
    return lo


def _is_factor(m: nn.Module) -> bool:
    return getattr(m, "_factor_of", None) is not None


def _cp_ok(conv: nn.Conv2d) -> bool:
    """CP's separable padding equals the conv's only with zero padding and a kernel over 1x1."""
    return conv.padding_mode == "zeros" and conv.kernel_size != (1, 1)


PLANNED_RATIOS = (0.5, 0.25, 0.0625)  # the per-layer ratios the planner weighs, mildest first
PLANNED_MIN_WEIGHTS = 2**20  # a linear layer is worth a planned low-rank option from a million weights


class Tucker2Handler(_LowRankHandler):
    """Also a planner lever (`--allow architecture`): a U·V option per wide linear layer outside the
    blocks (vgg's 4096-wide classifiers), at three ratios; ranks follow each layer's shape."""

    config_type = Tucker2Config
    plan_scope = "unit"

    def unit_kind(self, name: str, module: nn.Module) -> str | None:
        wide = isinstance(module, nn.Linear) and module.in_features * module.out_features >= PLANNED_MIN_WEIGHTS
        return "layer" if wide and self.eligible(name, module, Tucker2Config()) else None

    def candidates(self, kind: str) -> list[MethodConfig]:
        return [Tucker2Config(ratio=r) for r in PLANNED_RATIOS] if kind == "layer" else []

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        if isinstance(module, nn.Linear):
            return lowrank_linear(module, config)  # type: ignore[arg-type]
        return tucker2_conv(module, config)  # type: ignore[arg-type]

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        if config.reg == "none":  # type: ignore[attr-defined]
            return settings
        return dataclasses.replace(settings, orth=config.reg, orth_weight=config.reg_weight)  # type: ignore[attr-defined]


class CPHandler(_LowRankHandler):
    config_type = CPConfig

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        return cp_conv(module, config)  # type: ignore[arg-type]


for _h in (Tucker2Handler(), CPHandler()):
    register_method(_h)
register_alias("cp-refused", "cp:refuse=true")  # its old name: plans and scripts that use it still work


__all__ = [
    "FACTORIZED", "CPConfig", "CPConv2d", "LowRankLinear", "Tucker2Config", "Tucker2Conv2d",
    "conversion_report", "resize_to_",
]  # fmt: skip
