"""Reversible blocks (RevNet; Hascoet et al. 2019): activations that do not grow with depth.

An additive coupling splits channels, x = (x1, x2):  y1 = x1 + F(x2),  y2 = x2 + G(y1).
It is inverted exactly in real arithmetic:  x2 = y2 - G(y1),  x1 = y1 - F(x2).
`ReversibleSequence` runs a chain of such blocks (and invertible downsamplings) in one
autograd Function that keeps only the chain's output; backward walks the chain in reverse,
rebuilding each block's input from its output, re-running the block with grad enabled, and
back-propagating through it. BatchNorm statistics are updated once (in forward), every random
draw is replayed (any dropout kind; the CPU generator and the tensor's CUDA one), autocast is
re-entered as it was. The gradients equal those of the same chain with stored activations in
any graph around it (float64 to rounding; tests/methods/test_reversible_graphs.py).

Floating point makes the reconstruction drift along long chains: `reconstruction_errors`
measures it, and `check_every`/`tolerance` make the sequence verify it every N steps and keep
(store) the input of any block whose error passes the tolerance from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgetrain.errors import ConfigError
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

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        return self.record(x, capture=False)[0]

    def record(self, x, capture: bool = True) -> tuple[torch.Tensor, tuple]:
        """Forward, with the RNG states met before F and before G (what a replay needs)."""
        x1, x2 = x.chunk(2, dim=1)
        sf = RngState.capture(x) if capture else None
        y1 = x1 + self.f(x2)
        sg = RngState.capture(x) if capture else None
        return torch.cat([y1, x2 + self.g(y1)], dim=1), (sf, sg)

    def backward_pass(self, y, dy, grads: dict, rng: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild the input and back-propagate in one sweep (Gomez et al. 2017): G's graph, then
        F's, never both; F and G run once each. `y` and `dy` are private buffers of the chain's
        backward, overwritten in place with the block's input and its gradient (no full-size copy).
        Adds parameter gradients to `grads`; returns (x, dx)."""
        y1, y2 = y.chunk(2, dim=1)  # views: y1 stays until last, y2 becomes x2
        dy1, dy2 = dy.chunk(2, dim=1)  # views: dy1 becomes dL/dx1, dy2 becomes dL/dx2
        sf, sg = rng
        _undo_half(self.g, y1, y2, dy2, dy1, sg, grads)  # x2 = y2 - G(y1); dL/dy1 += G'(y1)^T dy2
        _undo_half(self.f, y2, y1, dy1, dy2, sf, grads)  # x1 = y1 - F(x2); dL/dx2 += F'(x2)^T dL/dy1
        return y, dy

    def inverse(self, y, rng: tuple = (None, None)):  # (N, C, H, W) -> (N, C, H, W)
        """The input, from the output; `rng` (from `record`) replays the forward's random draws."""
        y1, y2 = y.chunk(2, dim=1)
        sf, sg = rng
        with _rng(sg):
            x2 = y2 - self.g(y1)
        with _rng(sf):
            return torch.cat([y1 - self.f(x2), x2], dim=1)

    def replay_state(self, rng: tuple):
        """The state to restore before re-running the whole block: the one before F."""
        return rng[0]


class InvDownsample(nn.Module):
    """Space-to-depth by 2: (N, C, H, W) -> (N, 4C, H/2, W/2), a permutation, exactly invertible."""

    store_input = False

    def forward(self, x):
        return nn.functional.pixel_unshuffle(x, 2)

    def inverse(self, y, rng=None):
        return nn.functional.pixel_shuffle(y, 2)

    def backward_pass(self, y, dy, grads: dict, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and its gradient, written back into the buffers of `y` and `dy` (same sizes)."""
        x, dx = nn.functional.pixel_shuffle(y, 2), nn.functional.pixel_shuffle(dy, 2)
        y.view(x.shape).copy_(x)
        dy.view(dx.shape).copy_(dx)
        return y.view(x.shape), dy.view(dx.shape)


class RngState:
    """The generator states a block's random draws start from: the CPU generator, and the
    tensor's CUDA device generator when it lives there (dropout on a GPU draws from that one)."""

    def __init__(self, cpu: torch.Tensor, device: tuple[torch.device, torch.Tensor] | None):
        self.cpu, self.device = cpu, device

    @classmethod
    def capture(cls, x: torch.Tensor) -> RngState:
        return cls.now(x.device if x.device.type == "cuda" else None)

    @classmethod
    def now(cls, cuda: torch.device | None) -> RngState:
        """The CPU generator's state, and `cuda`'s generator's when given."""
        return cls(torch.get_rng_state(), (cuda, torch.cuda.get_rng_state(cuda)) if cuda is not None else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device[1], self.device[0])


class _rng:
    """Replay a block's random draws (every dropout kind, any module drawing from torch's
    generators), then put the generators back as they were."""

    def __init__(self, state: RngState | None):
        self.state = state

    def __enter__(self):
        if self.state is not None:
            self.saved = RngState.now(self.state.device[0] if self.state.device else None)
            self.state.restore()

    def __exit__(self, *exc):
        if self.state is not None:
            self.saved.restore()


def _record(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run one block of the chain, keeping what its replay needs (RNG states)."""
    if hasattr(block, "record"):
        return block.record(x)
    state = RngState.capture(x)
    return block(x), state


class _RevChain(torch.autograd.Function):
    """Forward without a graph, keeping only the output (and inputs of `store_input` blocks).

    Backward rebuilds inputs in private copies of the output and of the incoming gradient: the
    caller's tensors are never written, whoever else holds them (a residual around the chain
    gets the same gradient tensor; the output may be read again), and a retained graph can be
    run backward twice. Each call keeps its own RNG states, so several calls can precede one
    backward."""

    @staticmethod
    def forward(ctx, x, seq, *params):
        ctx.seq = seq
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng, kept, check, x_in = [], {}, seq._check_now(), x
        x = x.detach()  # blocks see plain tensors (module hooks, e.g. torch's MemTracker, expect that)
        with torch.no_grad():
            for i, block in enumerate(seq.blocks):
                if block.store_input or check:
                    kept[i] = x.detach().clone() if check and not block.store_input else x
                x, state = _record(block, x)
                ctx.rng.append(state)
        ctx.check, ctx.input_kept = check, bool(seq.blocks[0].store_input)  # then kept[0] is the caller's
        if ctx.input_kept:  # the caller's own tensor: saved, so autograd checks it is not modified
            del kept[0]
        ctx.kept = kept
        ctx.save_for_backward(x, *([x_in] if ctx.input_kept else []))
        return x

    @staticmethod
    def backward(ctx, dy):
        seq = ctx.seq
        y, *inp = ctx.saved_tensors
        kept = {**ctx.kept, **({0: inp[0]} if inp else {})}
        y = y.detach().clone(memory_format=torch.contiguous_format)
        dy = dy.clone(memory_format=torch.contiguous_format)
        grads: dict[nn.Parameter, torch.Tensor] = {}
        errors: dict[int, float] = {}
        for i in reversed(range(len(seq.blocks))):
            block, rng = seq.blocks[i], ctx.rng[i]
            if hasattr(block, "backward_pass") and i not in kept:
                with _autocast(y, ctx.autocast), frozen_bn_stats(block):
                    y, dy = block.backward_pass(y, dy, grads, rng)
                continue
            with torch.no_grad(), _autocast(y, ctx.autocast), frozen_bn_stats(block):
                x = kept[i] if block.store_input else block.inverse(y, rng)
            if ctx.check and i in kept:
                errors[i] = (x.float() - kept[i].float()).abs().max().item()
                x = kept[i]
            replay = block.replay_state(rng) if hasattr(block, "replay_state") else rng
            dy = _block_backward(block, x, dy, replay, ctx.autocast, grads)
            y = x.detach().clone() if i in kept and i > 0 else x.detach()  # kept tensors stay intact
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


def _block_backward(block, x, dy, rng, autocast, grads) -> torch.Tensor:
    """Re-run `block` on its rebuilt input with grad, back-propagate `dy`; returns dx."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad(), _autocast(x, autocast), frozen_bn_stats(block), _rng(rng):
        out = block(xg)
    return _grad(out, xg, block, dy, grads)


def _autocast(x, state):
    enabled, dtype = state
    return torch.autocast(x.device.type, dtype=dtype, enabled=enabled)


class ReversibleSequence(nn.Module):
    """A chain of couplings and invertible downsamplings whose activations are not stored."""

    def __init__(self, blocks: list[nn.Module], check_every: int = 0, tolerance: float = 1e-3, enabled: bool = True):
        super().__init__()
        for i, block in enumerate(blocks):
            if not callable(getattr(block, "inverse", None)):
                raise ConfigError(
                    f"ReversibleSequence: block {i} ({type(block).__name__}) has no inverse(), so its input cannot "
                    "be rebuilt: use Coupling / InvDownsample, give the module an inverse(y, rng), or run it outside the chain"
                )
            if not hasattr(block, "store_input"):
                block.store_input = False
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
    changes_layers: ClassVar[bool] = True  # other blocks, other weights: --allow architecture
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

    def export_(self, model: nn.Module) -> list[str]:
        """Chains run their couplings as plain layers (activations stored, traceable)."""
        chains = [m for m in model.modules() if isinstance(m, ReversibleSequence) and m.enabled]
        for m in chains:
            m.enabled = False
        return ["reversible"] if chains else []


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
