"""Reversible blocks (RevNet; Hascoet et al. 2019): activations that do not grow with depth.

An additive coupling splits channels, x = (x1, x2):  y1 = x1 + F(x2),  y2 = x2 + G(y1).
It is inverted exactly in real arithmetic:  x2 = y2 - G(y1),  x1 = y1 - F(x2).
`ReversibleSequence` runs a chain of such blocks (and invertible downsamplings) in one
autograd Function that keeps only the chain's output; backward walks the chain in reverse,
rebuilding each block's input from its output, re-running the block with grad enabled, and
back-propagating through it. BatchNorm statistics are updated once (in forward), dropout sees
the same mask in the re-run (RNG state restored), autocast is re-entered as it was.

Floating point makes the reconstruction drift along long chains: `reconstruction_errors`
measures it, and `check_every`/`tolerance` make the sequence verify it every N steps and keep
(store) the input of any block whose error passes the tolerance from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgetrain.methods.base import MethodConfig, MethodHandler, register_method
from edgetrain.methods.checkpoint import frozen_bn_stats


def residual_fn(channels: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """F or G of a coupling: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, channels -> channels."""
    layers = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, hidden, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers, nn.Conv2d(hidden, channels, 3, padding=1, bias=False))


class Coupling(nn.Module):
    """Additive coupling of two residual functions over the two channel halves."""

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g
        self.store_input = False  # set by the drift guard: keep this block's input
        self._random = any(isinstance(m, nn.Dropout) for m in self.modules())
        self._states = None  # RNG states before F and before G in the last training forward

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        x1, x2 = x.chunk(2, dim=1)
        sf = torch.get_rng_state() if self._random and self.training else None
        y1 = x1 + self.f(x2)
        sg = torch.get_rng_state() if sf is not None else None
        self._states = (sf, sg) if sf is not None else None
        return torch.cat([y1, x2 + self.g(y1)], dim=1)

    def backward_pass(self, y, dy, grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild the input and back-propagate in one sweep (Gomez et al. 2017): G's graph, then
        F's, never both; F and G run once each. `y` and `dy` are overwritten in place with the
        block's input and its gradient (the caller owns them), so no full-size copy is made.
        Adds parameter gradients to `grads`; returns (x, dx)."""
        y1, y2 = y.chunk(2, dim=1)  # views: y1 stays until last, y2 becomes x2
        dy1, dy2 = dy.chunk(2, dim=1)  # views: dy1 becomes dL/dx1, dy2 becomes dL/dx2
        sf, sg = self._states or (None, None)
        _undo_half(self.g, y1, y2, dy2, dy1, sg, grads)  # x2 = y2 - G(y1); dL/dy1 += G'(y1)^T dy2
        _undo_half(self.f, y2, y1, dy1, dy2, sf, grads)  # x1 = y1 - F(x2); dL/dx2 += F'(x2)^T dL/dy1
        return y, dy

    def inverse(self, y):  # (N, C, H, W) -> (N, C, H, W); dropout replays the forward's masks
        y1, y2 = y.chunk(2, dim=1)
        sf, sg = self._states or (None, None)
        with _rng(sg):
            x2 = y2 - self.g(y1)
        with _rng(sf):
            return torch.cat([y1 - self.f(x2), x2], dim=1)


class InvDownsample(nn.Module):
    """Space-to-depth by 2: (N, C, H, W) -> (N, 4C, H/2, W/2), a permutation, exactly invertible."""

    store_input = False

    def forward(self, x):
        return nn.functional.pixel_unshuffle(x, 2)

    def inverse(self, y):
        return nn.functional.pixel_shuffle(y, 2)

    def backward_pass(self, y, dy, grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and its gradient, written back into the buffers of `y` and `dy` (same sizes)."""
        x, dx = nn.functional.pixel_shuffle(y, 2), nn.functional.pixel_shuffle(dy, 2)
        y.view(x.shape).copy_(x)
        dy.view(dx.shape).copy_(dx)
        return y.view(x.shape), dy.view(dx.shape)


class _RevChain(torch.autograd.Function):
    """Forward without a graph, keeping only the output (and inputs of `store_input` blocks)."""

    @staticmethod
    def forward(ctx, x, seq, *params):
        ctx.seq = seq
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng, kept, check = [], {}, seq._check_now()
        with torch.no_grad():
            for i, block in enumerate(seq.blocks):
                if block.store_input or check:
                    kept[i] = x.detach().clone() if check and not block.store_input else x
                ctx.rng.append(torch.get_rng_state() if getattr(block, "_random", False) else None)
                x = block(x)
        ctx.kept, ctx.check = kept, check
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        seq = ctx.seq
        (y,) = ctx.saved_tensors
        # The chain rebuilds inputs in place: in the saved output itself (nothing after us needs it;
        # a second backward through the same graph is not supported) and in the incoming gradient
        # when it is a dense buffer of its own (else in a copy of it).
        y = y.detach()
        if not dy.is_contiguous() or dy.untyped_storage().nbytes() != dy.numel() * dy.element_size():
            dy = dy.clone(memory_format=torch.contiguous_format)
        grads: dict[nn.Parameter, torch.Tensor] = {}
        errors: dict[int, float] = {}
        for i in reversed(range(len(seq.blocks))):
            block = seq.blocks[i]
            if isinstance(block, Coupling | InvDownsample) and i not in ctx.kept:
                with _autocast(y, ctx.autocast), frozen_bn_stats(block):
                    y, dy = block.backward_pass(y, dy, grads)
                continue
            with torch.no_grad(), _autocast(y, ctx.autocast), frozen_bn_stats(block):
                x = ctx.kept[i] if block.store_input else block.inverse(y)
            if ctx.check and i in ctx.kept:
                errors[i] = (x.float() - ctx.kept[i].float()).abs().max().item()
                x = ctx.kept[i]
            y, dy = _block_backward(block, x, dy, ctx.rng[i], ctx.autocast, grads)
        if ctx.check:
            seq._record_errors(errors)
        return (dy, None, *(grads.get(p) for p in seq._params()))


def _undo_half(fn: nn.Module, inp, out, dout, dinp, rng_state, grads: dict) -> None:
    """One half of a coupling in reverse, in place: out -= fn(inp); dinp += d fn(inp)/d inp . dout.
    fn's graph lives only inside this call."""
    z = inp.detach().requires_grad_(True)
    with torch.enable_grad(), _rng(rng_state):
        h = fn(z)
    dinp.add_(_grad(h, z, fn, dout, grads))
    with torch.no_grad():
        out.sub_(h)


def _grad(out, inp, module: nn.Module, dout, grads: dict) -> torch.Tensor:
    """d(out)/d(inp) . dout, accumulating `module`'s parameter gradients into `grads`."""
    params = [p for p in module.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, [inp, *params], dout, allow_unused=True)
    for p, g in zip(params, got[1:], strict=True):
        if g is not None:
            grads[p] = g if p not in grads else grads[p] + g
    return got[0]


def _block_backward(block, x, dy, rng, autocast, grads):
    """Re-run `block` on its rebuilt input with grad, back-propagate `dy`; returns (x, dx)."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad(), _autocast(x, autocast), frozen_bn_stats(block), _rng(rng):
        out = block(xg)
    return x.detach(), _grad(out, xg, block, dy, grads)


def _autocast(x, state):
    enabled, dtype = state
    return torch.autocast(x.device.type, dtype=dtype, enabled=enabled)


class _rng:
    """Restore the CPU RNG state of the forward pass, so dropout draws the same mask."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        if self.state is not None:
            self.saved = torch.get_rng_state()
            torch.set_rng_state(self.state)

    def __exit__(self, *exc):
        if self.state is not None:
            torch.set_rng_state(self.saved)


class ReversibleSequence(nn.Module):
    """A chain of couplings and invertible downsamplings whose activations are not stored."""

    reversible_method = True  # `set_exportable` turns `enabled` off

    def __init__(self, blocks: list[nn.Module], check_every: int = 0, tolerance: float = 1e-3, enabled: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.enabled = enabled  # False: plain autograd, activations stored (reference, export)
        self.check_every, self.tolerance = check_every, tolerance
        self.steps = 0
        self.last_errors: dict[int, float] = {}

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _check_now(self) -> bool:
        return bool(self.check_every) and self.steps % self.check_every == 0

    def _record_errors(self, errors: dict[int, float]) -> None:
        self.last_errors = errors
        for i, err in errors.items():
            if err > self.tolerance:
                self.blocks[i].store_input = True

    def forward(self, x):
        if not (self.enabled and self.training and torch.is_grad_enabled() and (x.requires_grad or self._params())):
            return self._plain(x)
        self.steps += 1
        return _RevChain.apply(x, self, *self._params())

    def _plain(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> list[float]:
        """Max abs error of each block's rebuilt input after a forward pass and a full inverse."""
        inputs = []
        for block in self.blocks:
            inputs.append(x)
            x = block(x)
        errs = []
        for block, x_true in zip(reversed(self.blocks), reversed(inputs), strict=True):
            x = block.inverse(x)
            errs.append((x.float() - x_true.float()).abs().max().item())
        return errs[::-1]


@dataclass(frozen=True)
class ReversibleConfig(MethodConfig):
    """Turn runs of shape-preserving residual blocks into reversible couplings (new weights)."""

    name: ClassVar[str] = "reversible"
    risk: ClassVar[int] = 3
    help: ClassVar[str] = "runs of shape-preserving residual blocks -> reversible couplings (retrain)"
    check_every: int = 0
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.check_every < 0 or self.tolerance <= 0:
            raise ValueError("check_every must be >= 0 and tolerance > 0")


def _shape_preserving(block: nn.Module) -> int | None:
    """Channels of a stride-1 residual block without projection, else None."""
    name = type(block).__name__
    if name == "BasicBlock" and getattr(block, "downsample", None) is None and len(getattr(block, "shortcut", ())) == 0:
        conv = block.conv1
        if conv.stride == (1, 1) and conv.in_channels == block.conv2.out_channels and conv.in_channels % 2 == 0:
            return conv.in_channels
    return None


class ReversibleHandler(MethodHandler):
    config_type = ReversibleConfig

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        return isinstance(module, nn.Sequential) and len(_runs(module)) > 0

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        children = list(module)
        out: list[nn.Module] = []
        runs = {start: end for start, end in _runs(module)}
        i = 0
        while i < len(children):
            if i in runs:
                c = _shape_preserving(children[i])
                n = runs[i] - i
                couplings = [Coupling(residual_fn(c // 2, c // 2), residual_fn(c // 2, c // 2)) for _ in range(n)]
                out.append(ReversibleSequence(couplings, config.check_every, config.tolerance))  # type: ignore[attr-defined]
                i = runs[i]
            else:
                out.append(children[i])
                i += 1
        return nn.Sequential(*out)


def _runs(seq: nn.Sequential) -> list[tuple[int, int]]:
    """[start, end) index ranges of 2+ consecutive shape-preserving blocks of equal width."""
    runs, start, width = [], None, None
    children = list(seq) + [None]
    for i, child in enumerate(children):
        c = _shape_preserving(child) if child is not None else None
        if c is not None and c == width and start is not None:
            continue
        if start is not None and i - start >= 2:
            runs.append((start, i))
        start, width = (i, c) if c is not None else (None, None)
    return runs


register_method(ReversibleHandler())
