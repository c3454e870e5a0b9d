"""Activation compression: what backward needs, kept in far fewer bytes (ActNN / Facto-CNN).

`CompressHooks` is a `saved_tensors_hooks` context manager: every activation an op saves for
backward is packed (`packing.encode`) and unpacked when backward reads it. Parameters, their
autocast copies and small tensors (BatchNorm statistics) pass through untouched. A tensor saved
by several ops (a ReLU's output that the next conv saves as its input) is packed once.

The `compress` method applies it per layer (a class swap, so state-dict names do not change):
convs, linears and norms have their saved inputs packed; ReLU and ReLU6 keep an exact 1-bit mask
(or, with `relu=shared`, a ReLU's output is packed with its exact non-zero mask inside). Every
codec is unbiased: the mean of many decodes is the tensor (stochastic rounding), and packs do
not outlive the graph that saved them, so every step draws fresh noise. Inside a checkpointed
block nothing is packed: checkpointing stores nothing there.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from edgetrain.methods import packing
from edgetrain.methods.base import MethodConfig, MethodHandler, UnitCost, register_method, swap_class_
from edgetrain.methods.packing import Packed, decode, encode, pack_mask, unpack_mask

SCHEMES = ("quant", "similar", "none")
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Dropout)


@dataclass(frozen=True)
class CompressConfig(MethodConfig):
    """Pack saved activations: `quant` (min/max, `bits` in 1/2/4/8), `similar` (base + `bits`-bit
    deltas), `none` (lossless pass-through). `relu`: `mask` (default) keeps a 1-bit mask for the
    ReLU's own backward, and the next layer packs the values; `shared` packs the ReLU's output
    once with its non-zero mask inside (as many bytes when the next layer saves it, more when not).
    Both are unbiased and keep the ReLU mask exact."""

    name: ClassVar[str] = "compress"
    help: ClassVar[str] = "pack saved activations to 8/4/2 bits or base+delta (lossy, ~1/4..1/12 the bytes)"
    spec_keys: ClassVar[tuple[str, ...]] = ("bits",)
    bits: int = 4
    scheme: str = "quant"
    group: int = 256
    stochastic: bool = True
    relu: str = "mask"
    min_numel: int = 1024

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {self.bits}")
        if self.group < 8 or self.group % 8:
            raise ValueError(f"group must be a multiple of 8, got {self.group}")
        if self.relu not in ("shared", "mask"):
            raise ValueError(f"relu must be shared or mask, got {self.relu!r}")

    @property
    def risk(self) -> int:  # type: ignore[override]
        """Lossless 0 < 8-bit 1 < (micro-batch with BN 2) < 4-bit 3 < 2-bit and below 4."""
        if self.scheme == "none":
            return 0
        return {8: 1, 4: 3}.get(self.bits, 4) if self.scheme == "quant" else 3


# (storage key, codec) -> (weakref to the storage, version, view, weakref to the Packed): a tensor
# saved by several ops of one graph is packed once. An entry lives only as long as its pack is
# held by a graph that has not run backward yet: the next step (same input batch, same storage)
# packs afresh, with fresh rounding noise, at whatever codec its layer now asks for.
_PACKED: dict[tuple, tuple[weakref.ref, int, tuple, weakref.ref]] = {}


class CompressHooks(torch.autograd.graph.saved_tensors_hooks):
    """Pack what autograd saves inside this context; `stats` counts tensors and bytes (in, out)."""

    def __init__(self, config: CompressConfig, zero_exact: bool = False, skip: tuple[set, set] = (set(), set())):
        self.config, self.zero_exact, self.skip = config, zero_exact, skip
        self.stats = {"packed": 0, "bytes_in": 0, "bytes_out": 0}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> CompressHooks:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> Any:
        if not _compressible(t, self.config, self.skip):
            return t
        c, st = self.config, t.untyped_storage()
        key = (st._cdata, c.scheme, c.bits, c.group, c.stochastic, self.zero_exact)
        view = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        hit = _PACKED.get(key)
        if hit is not None and hit[0]() is st and hit[1] == t._version and hit[2] == view and hit[3]() is not None:
            return hit[3]()
        with torch.autocast(t.device.type, enabled=False):  # codes are exact integers: no half-precision matmuls
            p = encode(t, c.scheme, c.bits, c.group, c.stochastic, self.zero_exact)
        drop = _dropper(key)
        _PACKED[key] = (weakref.ref(st, drop), t._version, view, weakref.ref(p, drop))
        self.stats["packed"] += 1
        self.stats["bytes_in"] += t.numel() * t.element_size()
        self.stats["bytes_out"] += p.nbytes()
        return p

    @staticmethod
    def _unpack(p: Any) -> torch.Tensor:
        if not isinstance(p, Packed):
            return p
        with torch.autocast(p.tensors[0].device.type, enabled=False):
            return decode(p)


def _dropper(key: tuple):
    """A weakref callback that forgets `key` once its storage or its pack is gone (and only then:
    a newer entry under the same key is left alone)."""

    def drop(ref: weakref.ref) -> None:
        entry = _PACKED.get(key)
        if entry is not None and (entry[0] is ref or entry[3] is ref):
            del _PACKED[key]

    return drop


def _param_views(module: nn.Module) -> tuple[set[int], set[tuple[int, ...]]]:
    """Storages and shapes (and transposes) of a layer's own parameters: never activations."""
    ps = list(module.parameters(recurse=False))
    shapes = {tuple(p.shape) for p in ps} | {tuple(p.shape)[::-1] for p in ps if p.dim() == 2}
    return {p.untyped_storage()._cdata for p in ps}, shapes


def _compressible(t: torch.Tensor, c: CompressConfig, skip: tuple[set, set]) -> bool:
    if c.scheme == "none" or not t.is_floating_point() or t.numel() < c.min_numel:
        return False
    storages, shapes = skip
    if isinstance(t, nn.Parameter) or t.is_leaf and t.requires_grad or tuple(t.shape) in shapes:
        return False
    if t.untyped_storage()._cdata in storages:
        return False
    fn = t.grad_fn  # an autocast copy of a parameter is a weight, not an activation
    return not (fn is not None and type(fn).__name__ == "ToCopyBackward0" and _from_leaf(fn))


def _from_leaf(fn: Any) -> bool:
    return any(type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions if f is not None)


def _in_checkpoint() -> bool:
    """Whether checkpointing's own saved-tensor hooks are active (then nothing is stored here)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and getattr(top[0], "__module__", "") == "torch.utils.checkpoint"


class _MaskClamp(torch.autograd.Function):
    """clamp(x, lo, hi) whose backward keeps only the 1-bit mask lo < y < hi."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        y = x.clamp(lo, hi)
        inside = (y > lo) & (y < hi) if hi != float("inf") else y > lo
        ctx.save_for_backward(pack_mask(inside))
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return g * unpack_mask(bits, ctx.shape), None, None  # bool promotes: no float copy of the mask


class _MaskDropout(torch.autograd.Function):
    """Dropout that keeps its keep-mask at 1 bit per element for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(x) >= p
        ctx.save_for_backward(pack_mask(keep))
        ctx.shape, ctx.scale = x.shape, 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return g * unpack_mask(bits, ctx.shape) * ctx.scale, None


class _CompactMaxPool(torch.autograd.Function):
    """max_pool2d that keeps, per output, the argmax's offset inside its window (4 or 8 bits)
    instead of int64 flat indices and the input; backward scatters the gradient back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        k, s, p, d = (
            _pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation)
        )
        y, idx = nn.functional.max_pool2d(x, k, s, p, d, pool.ceil_mode, return_indices=True)  # (N, C, Ho, Wo)
        W = x.shape[-1]
        oh = torch.arange(y.shape[-2], device=x.device)[:, None] * s[0] - p[0]  # (Ho, 1) window top
        ow = torch.arange(y.shape[-1], device=x.device)[None, :] * s[1] - p[1]  # (1, Wo) window left
        rel = ((idx // W - oh) // d[0]) * k[1] + (idx % W - ow) // d[1]  # (N, C, Ho, Wo) in [0, kh*kw)
        bits = 4 if k[0] * k[1] <= 16 else 8
        codes = rel.to(torch.uint8).reshape(-1)
        codes = packing.pack_bits(nn.functional.pad(codes, (0, codes.numel() % 2)), bits)
        ctx.save_for_backward(codes)
        ctx.geom = (x.shape, y.shape, k, s, p, d, bits)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (codes,) = ctx.saved_tensors
        xs, ys, k, s, p, d, bits = ctx.geom
        rel = packing.unpack_bits(codes, bits)[: ys.numel()].view(ys).long()
        oh = torch.arange(ys[-2], device=g.device)[:, None] * s[0] - p[0]
        ow = torch.arange(ys[-1], device=g.device)[None, :] * s[1] - p[1]
        idx = (oh + rel // k[1] * d[0]) * xs[-1] + ow + rel % k[1] * d[1]  # (N, C, Ho, Wo) flat in H*W
        gx = g.new_zeros(xs).flatten(2)  # (N, C, H*W)
        gx.scatter_add_(2, idx.flatten(2), g.flatten(2))
        return gx.view(xs), None


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Compressed:
    """Mixin put in front of a layer's class: its forward runs under `CompressHooks`."""

    method = "compress"

    _compress: CompressConfig

    def forward(self, x, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()) or _in_checkpoint():
            return super().forward(x, *args, **kwargs)
        c = self._compress
        if isinstance(self, nn.ReLU6) or isinstance(self, nn.ReLU) and c.relu == "mask":
            hi = 6.0 if isinstance(self, nn.ReLU6) else float("inf")
            return _MaskClamp.apply(x, 0.0, hi)
        if isinstance(self, nn.Dropout):
            return _MaskDropout.apply(x, self.p) if self.p > 0 else x
        if isinstance(self, nn.MaxPool2d):
            return _CompactMaxPool.apply(x, self)
        with CompressHooks(c, zero_exact=isinstance(self, nn.ReLU), skip=_param_views(self)):
            return super().forward(x, *args, **kwargs)


PASSES_PER_PACKED_BYTE = 24.0  # read, noise, scale, round, pack, then unpack and rescale: bytes moved / byte saved
PLANNED_BITS = (8, 4, 2)


class CompressHandler(MethodHandler):
    config_type = CompressConfig
    plan_scope = "unit"

    def unit_kind(self, name: str, module: nn.Module) -> str | None:
        return "layer" if isinstance(module, LAYER_TYPES) else None

    def candidates(self, kind: str) -> list[MethodConfig]:
        """8, 4 and 2 bits, on a block (every layer inside) or a layer outside the blocks."""
        return [CompressConfig(bits=b) for b in PLANNED_BITS]

    def derived_from(self, config: MethodConfig) -> tuple[MethodConfig, ...]:
        """8 bits from the 4- and 2-bit runs (one fake step fewer)."""
        return (CompressConfig(bits=4), CompressConfig(bits=2)) if config == CompressConfig(bits=8) else ()

    def derive(self, config: MethodConfig, saved: Mapping[MethodConfig, int]) -> int:
        """Codes grow linearly with the bits, the metadata does not."""
        s4, s2 = saved[CompressConfig(bits=4)], saved[CompressConfig(bits=2)]
        return s4 + 2 * (s4 - s2)

    def keeps_dtype(self, config: MethodConfig) -> bool:
        return False  # packed codes: their size does not follow the autocast dtype

    def seconds(self, config: MethodConfig, unit: UnitCost) -> float:
        """Packing traffic: a number of passes over the bytes it would have saved plain."""
        return PASSES_PER_PACKED_BYTE * unit.saved_plain / (unit.bandwidth_gbs * 1e9)

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        return isinstance(module, LAYER_TYPES)

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        swap_class_(module, _Compressed)
        module._compress = config  # type: ignore[assignment]
        return module


register_method(CompressHandler())
