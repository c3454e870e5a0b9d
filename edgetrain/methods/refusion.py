"""Re-fusion (T1000): a factorized layer's chain run as one autograd Function that keeps less
for backward and recomputes the cheap intermediates there. `RefusedCP` runs CP's
1x1 . kx1 dw . 1xk dw . 1x1 chain; `RefusedTucker` runs Tucker-2's 1x1 . kxk . 1x1 chain.
Both give the unfused chain's gradients; with `compress` on the layer, what they keep is packed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from edgetrain.methods.lowrank_layers import CPConv2d, Tucker2Conv2d


def compress_hooks(m: nn.Module):
    """With `compress` on the chain's first conv, the Function's saved input and 1x1 output are
    packed like every other saved tensor (the weights never are)."""
    config = getattr(m.first, "_compress", None)
    from edgetrain.methods.compress import CompressHooks, _in_checkpoint

    if config is None or _in_checkpoint():
        return contextlib.nullcontext()
    return CompressHooks(config, skip=({p.untyped_storage()._cdata for p in m.parameters()}, set()))


def _depthwise(m: CPConv2d, a: torch.Tensor, wv: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    v, h = m.vertical, m.horizontal
    b = F.conv2d(a, wv, None, v.stride, v.padding, v.dilation, v.groups)  # (N, R, Ho, W)
    return F.conv2d(b, wh, None, h.stride, h.padding, h.dilation, h.groups)  # (N, R, Ho, Wo)


class RefusedCP(torch.autograd.Function):
    """The CP chain as one op: backward recomputes the depthwise intermediates (and, with
    recompute=all, the first 1x1's output) instead of finding them saved."""

    @staticmethod
    def forward(ctx, x, w1, wv, wh, w2, bias, m: CPConv2d):
        a = F.conv2d(x, w1, None, 1, 0, 1, m.first.groups)  # (N, R, H, W)
        y = F.conv2d(_depthwise(m, a, wv, wh), w2, bias, 1, 0, 1, m.last.groups)  # (N, C', Ho, Wo)
        keep_a = m.recompute == "depthwise" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.save_for_backward(x, w1, wv, wh, w2, a if keep_a else None)
        ctx.m = m
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w1, wv, wh, w2, a = ctx.saved_tensors
        m, needs = ctx.m, ctx.needs_input_grad
        if a is None:
            a = F.conv2d(x, w1, None, 1, 0, 1, m.first.groups)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in ((a, needs[0] or needs[1]), (wv, needs[2]),
                                                                (wh, needs[3]), (w2, needs[4]))]  # fmt: skip
            y = F.conv2d(_depthwise(m, leaves[0], leaves[1], leaves[2]), leaves[3], None, 1, 0, 1, m.last.groups)
            want = [t for t in leaves if t.requires_grad]
            got = iter(torch.autograd.grad(y, want, gy) if want else ())
        ga, gwv, gwh, gw2 = (next(got) if t.requires_grad else None for t in leaves)
        g = m.first.groups
        gx = torch.nn.grad.conv2d_input(x.shape, w1, ga, groups=g) if needs[0] else None
        gw1 = torch.nn.grad.conv2d_weight(x, w1.shape, ga, groups=g) if needs[1] else None
        gb = gy.sum((0, 2, 3)) if needs[5] else None
        return gx, gw1, gwv, gwh, gw2, gb, None


class RefusedTucker(torch.autograd.Function):
    """The Tucker-2 chain as one op: it keeps its input and the core's output; backward
    recomputes the first 1x1's output (the cheap part) instead of finding it saved."""

    @staticmethod
    def forward(ctx, x, w1, wc, w2, bias, m: Tucker2Conv2d):
        c, g = m.core, m.first.groups
        a = F.conv2d(x, w1, None, 1, 0, 1, g)  # (N, r_in, H, W)
        b = F.conv2d(a, wc, None, c.stride, c.padding, c.dilation, g)  # (N, r_out, Ho, Wo)
        needs = ctx.needs_input_grad  # keep only what the trained weights' gradients read
        ctx.save_for_backward(x if needs[1] or needs[2] else None, w1, wc, w2, b if needs[3] else None)
        ctx.m, ctx.x_shape, ctx.b_shape = m, x.shape, b.shape
        return F.conv2d(b, w2, bias, 1, 0, 1, g)  # (N, C', Ho, Wo)

    @staticmethod
    def backward(ctx, gy):
        x, w1, wc, w2, b = ctx.saved_tensors
        m, needs, g = ctx.m, ctx.needs_input_grad, ctx.m.first.groups
        c, grad = m.core, torch.nn.grad
        gw2 = grad.conv2d_weight(b, w2.shape, gy, groups=g) if needs[3] else None
        gb = gy.sum((0, 2, 3)) if needs[4] else None
        if not (needs[0] or needs[1] or needs[2]):
            return None, None, None, gw2, gb, None
        g_b = grad.conv2d_input(ctx.b_shape, w2, gy, groups=g)  # (N, r_out, Ho, Wo)
        a = F.conv2d(x, w1, None, 1, 0, 1, g) if x is not None else None  # recomputed (N, r_in, H, W)
        gwc = grad.conv2d_weight(a, wc.shape, g_b, c.stride, c.padding, c.dilation, g) if needs[2] else None
        n, _, h, w = ctx.x_shape
        g_a = grad.conv2d_input((n, w1.shape[0], h, w), wc, g_b, c.stride, c.padding, c.dilation, g)
        gx = grad.conv2d_input(ctx.x_shape, w1, g_a, groups=g) if needs[0] else None
        gw1 = grad.conv2d_weight(x, w1.shape, g_a, groups=g) if needs[1] else None
        return gx, gw1, gwc, gw2, gb, None
