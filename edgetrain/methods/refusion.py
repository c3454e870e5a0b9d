"""Re-fusion (T1000): a factorized layer's chain run as one autograd Function that keeps less
for backward and recomputes the cheap intermediates there. `RefusedCP` runs CP's
1x1 . kx1 dw . 1xk dw . 1x1 chain (the depthwise pair as one kxk depthwise conv); `RefusedTucker` runs Tucker-2's 1x1 . kxk . 1x1 chain.
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


def _separable(m: CPConv2d) -> dict:
    """The kx1 and 1xk depthwise pair as one kxk depthwise conv's geometry: a separable kernel's
    outer product computes the same sums (zero padding included), in one pass instead of two."""
    v, h = m.vertical, m.horizontal
    return dict(stride=[v.stride[0], h.stride[1]], padding=[v.padding[0], h.padding[1]],
                dilation=[v.dilation[0], h.dilation[1]], groups=v.groups)  # fmt: skip


def _conv_backward(gy, x, w, mask, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """(grad input, grad weight) of conv2d(x, w), each only where `mask` asks."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups, [mask[0], mask[1], False]
    )
    return gx, gw


NHWC_MIN_PIXELS = 64  # below 8x8 the two layout copies cost more than the reorders they save


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """On a CPU the chain runs channels-last inside the Function: oneDNN's depthwise and 1x1 convs
    then need no layout reorders (vgg11's CP layers at 64 px: 1.16x unfused's speed, bench/lowrank.txt).
    Small maps and other devices (unmeasured) keep the layout they come in."""
    cpu_map = t.device.type == "cpu" and t.dim() == 4 and t.shape[2] * t.shape[3] >= NHWC_MIN_PIXELS
    return t.contiguous(memory_format=torch.channels_last) if cpu_map else t


def _shape_only(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tensor of `shape` that holds no memory, for a conv backward that reads only the shape."""
    return like.new_empty(1).expand(shape)


class RefusedCP(torch.autograd.Function):
    """The CP chain as one op: 1x1 . (kx1 dw . 1xk dw as one kxk dw) . 1x1. It keeps the input and,
    with recompute=depthwise, the first 1x1's output; backward recomputes the depthwise output (and,
    with recompute=all, the first 1x1's) and runs each conv's backward directly: no op is replayed
    under autograd, so its cost is the unfused chain's backward plus one depthwise pass."""

    @staticmethod
    def forward(ctx, x, w1, wv, wh, w2, bias, m: CPConv2d):
        geo = _separable(m)
        a = F.conv2d(_nhwc(x), w1, None, 1, 0, 1, m.first.groups)  # (N, R, H, W)
        c = F.conv2d(a, wv * wh, None, **geo)  # (N, R, Ho, Wo): (R,1,kh,1) * (R,1,1,kw) -> (R,1,kh,kw)
        y = F.conv2d(c, w2, bias, 1, 0, 1, m.last.groups)  # (N, C', Ho, Wo)
        needs = ctx.needs_input_grad
        need_a = any(needs[2:5])  # the depthwise factors' and the last 1x1's gradients read a
        keep_a = m.recompute == "depthwise" and need_a
        keep_x = needs[1] or (need_a and not keep_a)  # the caller's x, not the channels-last copy
        ctx.save_for_backward(x if keep_x else None, w1, wv, wh, w2, a if keep_a else None)
        ctx.m, ctx.x_shape, ctx.a_shape, ctx.c_shape = m, x.shape, a.shape, c.shape
        return y.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last)

    @staticmethod
    def backward(ctx, gy):
        x, w1, wv, wh, w2, a = ctx.saved_tensors
        m, needs, geo = ctx.m, ctx.needs_input_grad, _separable(ctx.m)
        gb = gy.sum((0, 2, 3)) if needs[5] else None
        gy, x = _nhwc(gy), (_nhwc(x) if x is not None else None)
        need_a = any(needs[2:5])
        if a is None and need_a:
            a = F.conv2d(x, w1, None, 1, 0, 1, m.first.groups)  # recomputed (N, R, H, W)
        k = wv * wh  # (R, 1, kh, kw)
        c = F.conv2d(a, k, None, **geo) if needs[4] else _shape_only(gy, ctx.c_shape)  # recomputed
        gc, gw2 = _conv_backward(gy, c, w2, (any(needs[:4]), needs[4]), groups=m.last.groups)
        del c, gy
        gx = gw1 = gwv = gwh = None
        if any(needs[:4]):
            a = a if need_a else _shape_only(gc, ctx.a_shape)
            ga, gk = _conv_backward(gc, a, k, (needs[0] or needs[1], needs[2] or needs[3]), **geo)
            del gc, a
            if gk is not None:  # d(wv*wh): each factor's gradient is the other summed out
                gwv = (gk * wh).sum(3, keepdim=True) if needs[2] else None  # (R, 1, kh, 1)
                gwh = (gk * wv).sum(2, keepdim=True) if needs[3] else None  # (R, 1, 1, kw)
            if ga is not None:
                x = x if needs[1] else _shape_only(ga, ctx.x_shape)
                gx, gw1 = _conv_backward(ga, x, w1, (needs[0], needs[1]), groups=m.first.groups)
                gx = gx.contiguous() if gx is not None else None
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
