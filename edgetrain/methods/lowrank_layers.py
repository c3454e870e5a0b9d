"""The low-rank layers: Tucker-2 conv and U·V linear (ELRT), CP conv (T1000), each optionally
re-fused (methods/refusion.py), and `resize_to_` to load a checkpoint of factorized shapes.

`Tucker2Conv2d`: 1x1 (C -> r_in) . kxk (r_in -> r_out, the original's stride/padding/dilation/
groups) . 1x1 (r_out -> C'); a 1x1 conv or a linear layer becomes U·V (`LowRankLinear`).
`CPConv2d`: 1x1 (C -> R) . kx1 depthwise . 1xk depthwise . 1x1 (R -> C').
"""

from __future__ import annotations

import torch
from torch import nn

from edgetrain.methods import factorize as fz
from edgetrain.methods.refusion import RefusedCP, RefusedTucker, compress_hooks


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


FACTORIZED = (Tucker2Conv2d, LowRankLinear, CPConv2d)


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
