"""Converting a dense conv or linear into a low-rank layer: rank rules (fixed, energy kept, FLOP
ratio), the decomposition of its trained weights (HOSVD/HOOI, SVD, CP by ALS: methods/factorize.py)
or fresh factors, and a report of how far the converted model is from the dense one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgetrain.methods import factorize as fz
from edgetrain.methods.base import MethodConfig
from edgetrain.methods.lowrank_layers import FACTORIZED, CPConv2d, LowRankLinear, Tucker2Conv2d, dense_weight

MIN_CHANNELS = 8  # per group: below this a factorization saves nothing worth its extra layers


INITS = ("decompose", "random")  # what a spec may ask; "shapes" (unfilled factors) is `for_shapes`' alone


@dataclass(frozen=True)
class RankRule(MethodConfig):
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
        if self.init not in INITS:  # a run would train unfilled memory
            raise ValueError(f"init must be {' or '.join(INITS)}, got {self.init!r}")

    def for_shapes(self) -> RankRule:
        """Factors left uninitialized instead of a decomposition when the ranks do not read the
        weights: the same shapes and bytes, without minutes of SVDs (vgg11_bn's 25088x4096
        classifier) nor a second of random fill (what a planner's fake step needs)."""
        if self.energy and self.init == "decompose":
            return self
        twin = replace(self, init="random")
        object.__setattr__(twin, "init", "shapes")  # past the check a user's spec meets
        return twin

    def from_scratch(self) -> RankRule:
        """Fresh factors instead of a decomposition of random weights (which gives nothing, and
        takes minutes on vgg11_bn's 25088x4096), when the ranks do not read the weights."""
        return replace(self, init="random") if self.init == "decompose" and not self.energy else self


def _groups_of(w: torch.Tensor, g: int) -> list[torch.Tensor]:
    return list(w.chunk(g, 0))  # g x (O/g, I/g, kh, kw)


def _round_to(r: int, g: int, top: int) -> int:
    return min(top, max(g, g * round(r / g)))


def tucker2_ranks(conv: nn.Conv2d, c: RankRule) -> tuple[int, int]:
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


def linear_rank(linear: nn.Linear, c: RankRule) -> int:
    o, i = linear.out_features, linear.in_features
    if c.rank:
        return min(c.rank, o, i)
    if c.energy and c.init == "decompose":
        return fz.rank_for_energy(linear.weight.detach(), 0, c.energy)
    return fz.svd_rank(o, i, c.ratio)


def cp_rank(conv: nn.Conv2d, c: RankRule) -> int:
    g, (kh, kw) = conv.groups, conv.kernel_size
    rank = c.rank or g * fz.cp_rank(conv.out_channels // g, conv.in_channels // g, kh, kw, conv.stride[0], c.ratio)
    return max(g, g * math.ceil(rank / g))


def factored_params(module: nn.Module, c: RankRule) -> int:
    """Weights of `module` once factorized under `c` (no module is built)."""
    if isinstance(module, nn.Linear):
        return linear_rank(module, c) * (module.in_features + module.out_features)
    g, (kh, kw), i, o = module.groups, module.kernel_size, module.in_channels, module.out_channels
    if getattr(c, "iters", None) is not None:  # a CP rule (CPConfig): 1x1 . kx1 . 1xk . 1x1
        r = cp_rank(module, c)
        return r * (i // g + kh + kw + o // g)
    r_out, r_in = tucker2_ranks(module, c)
    core = 0 if kh * kw == 1 else r_in // g * r_out * kh * kw
    return i // g * r_in + core + (r_out if kh * kw > 1 else r_in) // g * o


def tucker2_conv(conv: nn.Conv2d, c: RankRule) -> Tucker2Conv2d:
    """Tucker-2 of a trained conv (HOSVD per group, `als` HOOI sweeps), or fresh factors."""
    g, w, k = conv.groups, conv.weight.detach(), conv.kernel_size[0] * conv.kernel_size[1]
    r_out, r_in = tucker2_ranks(conv, c)
    new = _new(lambda: Tucker2Conv2d(conv, r_out, r_in, c.refuse), c, w)
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
    new.conversion = {"rank": [r_out, r_in], "weight_error": _weight_error(new, conv, c)}
    return _mark(new)


def _tucker2_group(w: torch.Tensor, r_out: int, r_in: int, one: bool, als: int):
    """(first (r_in, I), core (r_out, r_in, kh, kw) or None, last (O, r_out)) of one group."""
    if one:
        us, vt = fz.svd2(w.flatten(1), r_in)  # (O, r), (r, I)
        return vt, None, us
    u_out, core, u_in = fz.tucker2(w, r_out, r_in, als)
    return u_in.T, core, u_out


def lowrank_linear(linear: nn.Linear, c: RankRule) -> LowRankLinear:
    r = linear_rank(linear, c)
    new = _new(lambda: LowRankLinear(linear, r), c, linear.weight)
    with torch.no_grad():
        if c.init == "decompose":
            us, vt = fz.svd2(linear.weight, r)
            new.first.weight.copy_(vt)
            new.last.weight.copy_(us)
        if linear.bias is not None:
            new.last.bias.copy_(linear.bias)
    new.conversion = {"rank": [r], "weight_error": _weight_error(new, linear, c)}
    return _mark(new)


def cp_conv(conv: nn.Conv2d, c: RankRule) -> CPConv2d:
    """CP of a trained conv by ALS, per group, or fresh factors."""
    g, w = conv.groups, conv.weight.detach()
    rank = cp_rank(conv, c)
    new = _new(lambda: CPConv2d(conv, rank, c.refuse, c.recompute), c, w)
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
    new.conversion = {"rank": [rank], "weight_error": _weight_error(new, conv, c)}
    return _mark(new)


def _new(build: Callable[[], nn.Module], c: RankRule, like: torch.Tensor) -> nn.Module:
    """The factorized layer on `like`'s device and dtype, its weights filled at random only when they
    are trained from there (`init=random`): a decomposition copies its own in, shapes need none."""
    if c.init == "random":
        return build().to(like.device, like.dtype)
    with torch.device("meta"):
        new = build()
    return new.to_empty(device=like.device).to(like.dtype)


def _weight_error(new: nn.Module, old: nn.Module, c: RankRule) -> float | None:
    """How far the factors are from the weights they replace; None for fresh factors (no conversion:
    and no dense weight built for every layer while planning, which shapes-only twins are for)."""
    if c.init != "decompose":
        return None
    with torch.no_grad():
        return fz.relative_error(dense_weight(new), old.weight)


def _mark(new: nn.Module) -> nn.Module:
    """Tag a factorized layer's parts, so that no low-rank method factorizes them again."""
    for part_name, part in new.named_children():
        part._factor_of = part_name
    return new


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
