"""Low-rank layers: Tucker-2 conv (ELRT), U·V linear, CP conv (T1000) with re-fusion, and the
methods that put them in place of trained (or freshly initialised) `nn.Conv2d`/`nn.Linear`.

`tucker2`: 1x1 (C -> r_in) . kxk (r_in -> r_out, the original's stride/padding/dilation/groups)
. 1x1 (r_out -> C'); a 1x1 conv or a linear layer becomes U·V. `cp`: 1x1 (C -> R) . kx1
depthwise . 1xk depthwise . 1x1 (R -> C'); with `refuse` (either method) the chain runs as one
autograd Function that keeps less and recomputes the cheap intermediates (methods/refusion.py). Weights are decomposed from the layer's current values
(`init=decompose`, a conversion) or drawn fresh (`init=random`, training from scratch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.methods import factorize as fz
from edgetrain.methods.base import MethodConfig, MethodHandler, apply_method_, register_method
from edgetrain.methods.refusion import RefusedCP, RefusedTucker, compress_hooks
from edgetrain.train.step import StepSettings

MIN_CHANNELS = 8  # per group: below this a factorization saves nothing worth its extra layers


@dataclass(frozen=True)
class _RankRule(MethodConfig):
    """How ranks are chosen: a fixed `rank`, else `energy` kept (of the trained weights), else a
    `budget` (the fraction of the whole model's parameters to keep: one per-layer ratio is
    searched for it), else a FLOP `ratio` per layer (0.5 = half the layer's FLOPs)."""

    rank: int = 0
    ratio: float = 0.5
    energy: float = 0.0
    budget: float = 0.0
    init: str = "decompose"

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: by ratio or energy), got {self.rank}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 0 <= self.energy <= 1:
            raise ValueError(f"energy must be in [0, 1] (0: by ratio), got {self.energy}")
        if not 0 <= self.budget < 1:
            raise ValueError(
                f"budget must be in [0, 1) (a fraction of the model's parameters; 0: off), got {self.budget}"
            )
        if self.init not in ("decompose", "random"):
            raise ValueError(f"init must be decompose or random, got {self.init!r}")

    def for_shapes(self) -> _RankRule:
        """Fresh factors instead of a decomposition when the ranks do not read the weights: the
        same shapes and bytes, without minutes of SVDs (vgg11_bn's 25088x4096 classifier)."""
        return replace(self, init="random") if self.init == "decompose" and not self.energy else self


@dataclass(frozen=True)
class Tucker2Config(_RankRule):
    """Tucker-2 convs and U·V linears; `als` HOOI sweeps after HOSVD; `reg` an ELRT orthogonality
    regularizer on the factor matrices (none|so|dso|srip|mc) added to the loss with `reg_weight`;
    `refuse` runs each chain as one Function that recomputes the first 1x1's output in backward."""

    name: ClassVar[str] = "tucker2"
    risk: ClassVar[int] = 5
    structural: ClassVar[bool] = True
    help: ClassVar[str] = "Tucker-2 conv / U·V linear (ELRT): fewer FLOPs and params; optional orthogonality reg"
    als: int = 0
    reg: str = "none"
    reg_weight: float = 1e-3
    refuse: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from edgetrain.methods.orthogonality import REGULARIZERS

        if self.reg != "none" and self.reg not in REGULARIZERS:
            raise ValueError(f"reg must be none or one of {', '.join(REGULARIZERS)}, got {self.reg!r}")
        if self.als < 0 or self.reg_weight < 0:
            raise ValueError("als and reg_weight must be >= 0")


@dataclass(frozen=True)
class CPConfig(_RankRule):
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


@dataclass(frozen=True)
class CPRefusedConfig(CPConfig):
    name: ClassVar[str] = "cp-refused"
    help: ClassVar[str] = "cp with refuse=true: T1000 re-fusion, depthwise intermediates recomputed in backward"
    refuse: bool = True


class Tucker2Conv2d(nn.Module):
    """first 1x1 (C -> r_in) . core kxk (r_in -> r_out) . last 1x1 (r_out -> C'); a 1x1 conv has no
    core and its first 1x1 takes the stride. Groups stay groups in every part."""

    def __init__(self, conv: nn.Conv2d, r_out: int, r_in: int, refuse: bool = False):
        super().__init__()
        self.refuse = refuse
        g, k = conv.groups, conv.kernel_size
        spatial = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
        one = k == (1, 1)
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, groups=g, bias=False, **(spatial if one else {}))
        self.core = None if one else nn.Conv2d(r_in, r_out, k, groups=g, bias=False, **spatial)
        self.last = nn.Conv2d(r_out if not one else r_in, conv.out_channels, 1, groups=g, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.core
        if (
            self.refuse
            and core is not None
            and core.padding_mode == "zeros"
            and self.training
            and torch.is_grad_enabled()
        ):
            ws = (self.first.weight, core.weight, self.last.weight)
            with compress_hooks(self):
                return RefusedTucker.apply(x, *ws, self.last.bias, self)
        x = self.first(x)  # (N, r_in, H, W)
        if self.core is not None:
            x = self.core(x)  # (N, r_out, Ho, Wo)
        return self.last(x)  # (N, C', Ho, Wo)

    def set_exportable_(self) -> str | None:
        was, self.refuse = self.refuse, False
        return "tucker2 refuse" if was else None

    def factor_matrices(self) -> list[torch.Tensor]:
        """The matrices ELRT keeps orthonormal (columns), one pair per group: U_in (I/g, r_in/g)
        from `first` and U_out (O/g, r_out/g) from `last`."""
        g = self.first.groups
        u_in = self.first.weight.flatten(1).chunk(g, 0)  # g x (r_in/g, I/g)
        u_out = self.last.weight.flatten(1).chunk(g, 0)  # g x (O/g, r_out/g)
        return [u.T for u in u_in] + (list(u_out) if self.core is not None else [])


class LowRankLinear(nn.Module):
    """first (I -> r, orthonormal rows at conversion) . last (r -> O, with the bias)."""

    def __init__(self, linear: nn.Linear, r: int):
        super().__init__()
        self.first = nn.Linear(linear.in_features, r, bias=False)
        self.last = nn.Linear(r, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))  # (N, r) -> (N, O)

    def factor_matrices(self) -> list[torch.Tensor]:
        return [self.first.weight.T]  # (I, r)


class CPConv2d(nn.Module):
    """first 1x1 (C -> R) . vertical kx1 depthwise . horizontal 1xk depthwise . last 1x1 (R -> C')."""

    def __init__(self, conv: nn.Conv2d, rank: int, refuse: bool = False, recompute: str = "depthwise"):
        super().__init__()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        g = conv.groups
        self.first = nn.Conv2d(conv.in_channels, rank, 1, groups=g, bias=False)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
        self.last = nn.Conv2d(rank, conv.out_channels, 1, groups=g, bias=conv.bias is not None)
        self.refuse, self.recompute = refuse, recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.refuse and self.training and torch.is_grad_enabled():
            ws = (self.first.weight, self.vertical.weight, self.horizontal.weight, self.last.weight)
            with compress_hooks(self):
                return RefusedCP.apply(x, *ws, self.last.bias, self)
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def set_exportable_(self) -> str | None:
        """Run as four plain convs (traceable); returns the method switched off, if any."""
        was, self.refuse = self.refuse, False
        return "cp-refused" if was else None


# --- conversion -------------------------------------------------------------------------------------


def _groups_of(w: torch.Tensor, g: int) -> list[torch.Tensor]:
    return list(w.chunk(g, 0))  # g x (O/g, I/g, kh, kw)


def _round_to(r: int, g: int, top: int) -> int:
    return min(top, max(g, g * round(r / g)))


def tucker2_ranks(conv: nn.Conv2d, c: _RankRule) -> tuple[int, int]:
    """(r_out, r_in) of a conv's Tucker-2 under the config's rank rule (multiples of the groups)."""
    g, w = conv.groups, conv.weight.detach()
    o, i, k = conv.out_channels, conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
    if c.rank:
        r_out, r_in = min(c.rank, o), min(c.rank, i)
    elif c.energy and c.init == "decompose":
        r_out = max(fz.rank_for_energy(wg, 0, c.energy) for wg in _groups_of(w, g)) * g
        r_in = max(fz.rank_for_energy(wg, 1, c.energy) for wg in _groups_of(w, g)) * g
    elif k == 1:
        r_out = r_in = g * fz.svd_rank(o // g, i // g, c.ratio)
    else:
        r_out, r_in = (r * g for r in fz.tucker2_ranks(o // g, i // g, k, conv.stride[0], c.ratio))
    r_out, r_in = _round_to(r_out, g, o), _round_to(r_in, g, i)
    return (min(r_out, r_in),) * 2 if k == 1 else (r_out, r_in)  # type: ignore[return-value]


def linear_rank(linear: nn.Linear, c: _RankRule) -> int:
    o, i = linear.out_features, linear.in_features
    if c.rank:
        return min(c.rank, o, i)
    if c.energy and c.init == "decompose":
        return fz.rank_for_energy(linear.weight.detach(), 0, c.energy)
    return fz.svd_rank(o, i, c.ratio)


def cp_rank(conv: nn.Conv2d, c: _RankRule) -> int:
    g, (kh, kw) = conv.groups, conv.kernel_size
    rank = c.rank or g * fz.cp_rank(conv.out_channels // g, conv.in_channels // g, kh, kw, conv.stride[0], c.ratio)
    return max(g, g * math.ceil(rank / g))


def factored_params(module: nn.Module, c: _RankRule) -> int:
    """Weights of `module` once factorized under `c` (no module is built)."""
    if isinstance(module, nn.Linear):
        return linear_rank(module, c) * (module.in_features + module.out_features)
    g, (kh, kw), i, o = module.groups, module.kernel_size, module.in_channels, module.out_channels
    if isinstance(c, CPConfig):
        r = cp_rank(module, c)
        return r * (i // g + kh + kw + o // g)
    r_out, r_in = tucker2_ranks(module, c)
    core = 0 if kh * kw == 1 else r_in // g * r_out * kh * kw
    return i // g * r_in + core + (r_out if kh * kw > 1 else r_in) // g * o


def tucker2_conv(conv: nn.Conv2d, c: Tucker2Config) -> Tucker2Conv2d:
    """Tucker-2 of a trained conv (HOSVD per group, `als` HOOI sweeps), or fresh factors."""
    g, w, k = conv.groups, conv.weight.detach(), conv.kernel_size[0] * conv.kernel_size[1]
    r_out, r_in = tucker2_ranks(conv, c)
    new = Tucker2Conv2d(conv, r_out, r_in, c.refuse).to(w.device, w.dtype)
    if c.init == "decompose":
        parts = [_tucker2_group(wg, r_out // g, r_in // g, k == 1, c.als) for wg in _groups_of(w, g)]
        with torch.no_grad():
            new.first.weight.copy_(torch.cat([p[0] for p in parts]).view_as(new.first.weight))
            if new.core is not None:
                new.core.weight.copy_(torch.cat([p[1] for p in parts]))
            new.last.weight.copy_(torch.cat([p[2] for p in parts]).view_as(new.last.weight))
    if conv.bias is not None:
        with torch.no_grad():
            new.last.bias.copy_(conv.bias)
    new.conversion = {"rank": [r_out, r_in], "weight_error": _weight_error(new, conv)}
    return _mark(new)


def _tucker2_group(w: torch.Tensor, r_out: int, r_in: int, one: bool, als: int):
    """(first (r_in, I), core (r_out, r_in, kh, kw) or None, last (O, r_out)) of one group."""
    if one:
        us, vt = fz.svd2(w.flatten(1), r_in)  # (O, r), (r, I)
        return vt, None, us
    u_out, core, u_in = fz.tucker2(w, r_out, r_in, als)
    return u_in.T, core, u_out


def lowrank_linear(linear: nn.Linear, c: Tucker2Config) -> LowRankLinear:
    r = linear_rank(linear, c)
    new = LowRankLinear(linear, r).to(linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        if c.init == "decompose":
            us, vt = fz.svd2(linear.weight, r)
            new.first.weight.copy_(vt)
            new.last.weight.copy_(us)
        if linear.bias is not None:
            new.last.bias.copy_(linear.bias)
    new.conversion = {"rank": [r], "weight_error": _weight_error(new, linear)}
    return _mark(new)


def cp_conv(conv: nn.Conv2d, c: CPConfig) -> CPConv2d:
    """CP of a trained conv by ALS, per group, or fresh factors."""
    g, w = conv.groups, conv.weight.detach()
    rank = cp_rank(conv, c)
    new = CPConv2d(conv, rank, c.refuse, c.recompute).to(w.device, w.dtype)
    if c.init == "decompose":
        parts = [fz.cp_als(wg, rank // g, c.iters)[0] for wg in _groups_of(w, g)]
        with torch.no_grad():
            new.last.weight.copy_(torch.cat([p[0] for p in parts]).view_as(new.last.weight))  # (O, R/g)
            new.first.weight.copy_(torch.cat([p[1].T for p in parts]).view_as(new.first.weight))  # (R, I/g)
            new.vertical.weight.copy_(torch.cat([p[2].T for p in parts]).view_as(new.vertical.weight))  # (R,1,kh,1)
            new.horizontal.weight.copy_(torch.cat([p[3].T for p in parts]).view_as(new.horizontal.weight))
    if conv.bias is not None:
        with torch.no_grad():
            new.last.bias.copy_(conv.bias)
    new.conversion = {"rank": [rank], "weight_error": _weight_error(new, conv)}
    return _mark(new)


def dense_weight(m: nn.Module) -> torch.Tensor:
    """The dense weight a factorized layer computes ((O, I/g, kh, kw), or (O, I) for a linear)."""
    if isinstance(m, LowRankLinear):
        return m.last.weight @ m.first.weight
    g = m.first.groups
    if isinstance(m, CPConv2d):
        a, b = m.last.weight.flatten(1).chunk(g, 0), m.first.weight.flatten(1).chunk(g, 0)
        kh, kw = m.vertical.weight.flatten(1).chunk(g, 0), m.horizontal.weight.flatten(1).chunk(g, 0)
        return torch.cat([fz.cp_rebuild([a[j], b[j].T, kh[j].T, kw[j].T]) for j in range(g)])
    u_in = m.first.weight.flatten(1).chunk(g, 0)  # g x (r_in/g, I/g)
    u_out = m.last.weight.flatten(1).chunk(g, 0)  # g x (O/g, r_out/g)
    if m.core is None:
        return torch.cat([(u_out[j] @ u_in[j])[:, :, None, None] for j in range(g)])
    cores = m.core.weight.chunk(g, 0)
    return torch.cat([fz.tucker2_rebuild(u_out[j], cores[j], u_in[j].T) for j in range(g)]).to(u_in[0].dtype)


def _weight_error(new: nn.Module, old: nn.Module) -> float:
    with torch.no_grad():
        return fz.relative_error(dense_weight(new), old.weight)


FACTORIZED = (Tucker2Conv2d, LowRankLinear, CPConv2d)


def _mark(new: nn.Module) -> nn.Module:
    """Tag a factorized layer's parts, so that no low-rank method factorizes them again."""
    for part_name, part in new.named_children():
        part._factor_of = part_name
    return new


class _LowRankHandler(MethodHandler):
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


def ratio_for_budget(model: nn.Module, c: _RankRule, handler: _LowRankHandler) -> float:
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


class Tucker2Handler(_LowRankHandler):
    config_type = Tucker2Config

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


class CPRefusedHandler(CPHandler):
    config_type = CPRefusedConfig


for _h in (Tucker2Handler(), CPHandler(), CPRefusedHandler()):
    register_method(_h)


@torch.no_grad()
def conversion_report(dense: nn.Module, converted: nn.Module, x: torch.Tensor) -> dict:
    """How far the factorized model is from the dense one it came from, on sample inputs `x`:
    per layer the rank, the weight's relative error and the output's relative error on the
    dense layer's own inputs; for the model, the logits' relative error and top-1 agreement."""
    layers = {n: m for n, m in converted.named_modules() if isinstance(m, FACTORIZED)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mods = dict(dense.named_modules())

    def keep(name: str, inputs: tuple, output: torch.Tensor) -> None:
        seen.setdefault(name, (inputs[0], output))

    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: keep(n, i, o)) for n in layers]
    was = dense.training, converted.training
    dense.eval(), converted.eval()
    try:
        ref = dense(x)
        out = converted(x)
    finally:
        for h in hooks:
            h.remove()
        dense.train(was[0]), converted.train(was[1])
    rows = {}
    for n, m in layers.items():
        inp, want = seen[n]
        rows[n] = {**m.conversion, "output_error": fz.relative_error(m(inp), want)}
    return {
        "layers": rows,
        "logits_error": fz.relative_error(out, ref),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
    }


def resize_to_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each factorized layer's parts the ranks a state dict holds (in place), so that a
    checkpoint of a model converted with weight-dependent ranks (`energy`) loads into a freshly
    built one. Classes, geometry and `requires_grad` are kept; the values come from the load."""
    for name, m in model.named_modules():
        if not isinstance(m, FACTORIZED):
            continue
        for part_name, part in m.named_children():
            want = state.get(f"{name}.{part_name}.weight")
            if want is None or want.shape == part.weight.shape:
                continue
            depthwise = (
                isinstance(part, nn.Conv2d) and part.groups > 1 and part.groups == part.in_channels == part.out_channels
            )
            part.weight = nn.Parameter(torch.empty_like(want, device=part.weight.device), part.weight.requires_grad)
            if isinstance(part, nn.Linear):
                part.out_features, part.in_features = want.shape
            else:
                part.groups = want.shape[0] if depthwise else part.groups
                part.out_channels, part.in_channels = want.shape[0], want.shape[1] * part.groups
            if part.bias is not None and part.bias.shape[0] != want.shape[0]:
                part.bias = nn.Parameter(torch.empty(want.shape[0], device=part.weight.device), part.bias.requires_grad)
