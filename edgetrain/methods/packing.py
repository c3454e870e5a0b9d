"""Codecs for saved activations, bit-packed into uint8 storage (the bytes kept are the bytes counted).

- `quantize`: per-group min/max to 1..8 bits with stochastic rounding (unbiased w.r.t. the
  stored min and scale, which are rounded outwards to bf16 so that no value is clipped).
- `similar`: Facto-CNN's value similarity read as base + delta: each run of `block` neighbouring
  values (along W) shares one 8-bit base (its mean); only the small differences are kept, at
  `bits` bits, plus a 1-bit mask that restores exact zeros (ReLU outputs).
- `pack_mask`: a boolean map at 1 bit per element (what a ReLU's backward needs).

Every codec is plain torch ops (CPU and CUDA, no toolchain), worked through in chunks so that its
temporaries stay small, and runs under fake tensors, so the predictor measures the packed sizes
exactly. Where a compiler works, `quantize` and `dequantize` run as fused kernels (`fused`): the same
bytes, the same codes for the same random bytes, a few times faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from edgetrain.methods import fused

META_DTYPE = torch.bfloat16  # min and scale per group: 4 bytes a group


def _pack_float(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes in [0, 2**bits) (numel a multiple of 8 // bits) -> uint8 bytes. A small matvec
    (code i times 2**(bits*i)) is exact in float32 and far faster than shifts on uint8."""
    per = 8 // bits
    if per == 1:
        return v.reshape(-1).to(torch.uint8)
    w = torch.tensor([float(2 ** (bits * i)) for i in range(per)], device=v.device)  # (per,)
    return (v.reshape(-1, per) @ w).to(torch.uint8)


def _unpack_float(p: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes -> float codes, flat, through a 256-row lookup table (one gather a byte)."""
    if bits == 8:
        return p.float()
    per = 8 // bits
    table = torch.stack([(torch.arange(256, device=p.device) >> (bits * i)) & (2**bits - 1) for i in range(per)], 1)
    return F.embedding(p.int(), table.float()).reshape(-1)  # (numel * per,)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits (numel a multiple of 8 // bits) -> uint8 with 8 // bits codes a byte."""
    return _pack_float(q.float(), bits)


def unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 codes, flat."""
    return _unpack_float(p, bits).to(torch.uint8)


def pack_mask(m: torch.Tensor) -> torch.Tensor:
    """A boolean tensor at 1 bit per element (padded to a whole byte), packed a chunk at a time so
    that its float temporaries stay small (whole, they were two fp32 copies of the mask: a ReLU's
    mask made the 2-bit step's peak)."""
    flat = m.reshape(-1)
    out = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=m.device)
    for a, b in _chunks(flat.numel(), m, CHUNK_GROUPS * 256):  # chunks of a multiple of 8
        part = flat[a:b].float()
        out[a // 8 : -(-b // 8)] = _pack_float(F.pad(part, (0, (-part.numel()) % 8)), 1)
    return out


def unpack_mask(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The boolean tensor back, unpacked a chunk at a time (one byte an element, no fp32 copy)."""
    n = shape.numel()
    out = torch.empty(n, dtype=torch.bool, device=p.device)
    for a, b in _chunks(n, p, CHUNK_GROUPS * 256):
        out[a:b] = _unpack_float(p[a // 8 : -(-b // 8)], 1)[: b - a] > 0
    return out.view(shape)


@dataclass
class Packed:
    """A compressed saved tensor: payload tensors plus what decoding needs."""

    scheme: str
    shape: torch.Size
    dtype: torch.dtype
    tensors: tuple[torch.Tensor, ...]
    bits: int
    group: int
    block: int = 1
    zero_exact: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


CHUNK_GROUPS = 1024  # the eager codec works through this many groups at a time: ~1 MiB temporaries


def noise_bytes(n: int, device: torch.device) -> torch.Tensor:
    """n random bytes, uniform on 0..255, from n / 8 full 64-bit draws (one generator call per 8
    bytes: far cheaper than `torch.rand` on a CPU). Stochastic rounding adds (byte + 0.5) / 256,
    which is biased by at most 1/512 of a quantization step."""
    r = torch.empty(-(-n // 8), dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return r.view(torch.uint8)[:n]


def _round_out(lo: torch.Tensor, width: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 min rounded down and bf16 scale rounded up, so [min, min + levels*scale] covers the group."""
    ninf = torch.full_like(lo, -float("inf"), dtype=META_DTYPE)
    lo_b = lo.to(META_DTYPE)
    lo_b = torch.where(lo_b.float() > lo, torch.nextafter(lo_b, ninf), lo_b)
    scale = ((width + (lo - lo_b.float())) / levels).clamp_min(1e-30)
    sc_b = scale.to(META_DTYPE)
    sc_b = torch.where(sc_b.float() < scale, torch.nextafter(sc_b, -ninf), sc_b)
    return lo_b, sc_b


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x flat in its own dtype, padded to whole groups: (G, group), a view unless padded."""
    flat = x.detach().reshape(-1)
    pad = (-flat.numel()) % group
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, group)  # (G, group)


def _chunks(n: int, t: torch.Tensor, size: int = 0) -> list[tuple[int, int]]:
    """Ranges of `size` (default `CHUNK_GROUPS`) the eager codec works through, out of `n` groups or
    elements; under fake tensors only the first, whose temporaries are every chunk's (the
    predictor needs the bytes, not the values)."""
    size = size or CHUNK_GROUPS
    spans = [(a, min(a + size, n)) for a in range(0, n, size)]
    return spans[:1] if isinstance(t, FakeTensor) else spans


def quantize(x: torch.Tensor, bits: int, group: int = 256, stochastic: bool = True, zero_exact: bool = False) -> Packed:
    """Per-group min/max quantization. `zero_exact` (ReLU outputs): a 1-bit mask of the non-zeros
    rides along, so `decoded > 0` equals `x > 0` exactly (what ReLU's backward reads) while the
    values stay unbiased (forcing positives to code >= 1 instead biased the mean: +42 % at 2 bits).
    A fused kernel packs where one runs (`fused`); the eager chunks compute the same from the
    same random bytes."""
    g = _groups(x, group)  # (G, group)
    lo, hi = torch.aminmax(g, dim=1)  # (G,)
    lo_b, sc_b = _round_out(lo.float(), hi.float() - lo.float(), 2**bits - 1)
    lo_f, inv = lo_b.float(), 1.0 / sc_b.float()
    noise = noise_bytes(g.numel(), g.device) if stochastic else None
    got = fused.encode(g, lo_f, inv, noise, bits, zero_exact) if fused.usable(g) else None
    codes, mask = got if got is not None else _encode_chunks(g, lo_f, inv, noise, bits, zero_exact)
    meta = torch.stack([lo_b, sc_b])  # (2, G) bf16
    return Packed("quant", x.shape, x.dtype, (codes, meta, *([mask] if zero_exact else [])), bits, group,
                  zero_exact=zero_exact)  # fmt: skip


def _encode_chunks(g: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, noise: torch.Tensor | None, bits: int,
                   zero_exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The eager codec, chunk by chunk, in the fused kernel's order of float ops."""
    n_groups, group = g.shape
    per = 8 // bits
    codes = torch.empty(g.numel() // per, dtype=torch.uint8, device=g.device)
    mask = torch.empty(g.numel() // 8, dtype=torch.uint8, device=g.device) if zero_exact else None
    for a, b in _chunks(n_groups, g):
        v = g[a:b].float() * inv[a:b, None] - lo[a:b, None] * inv[a:b, None]  # (c, group) in [0, levels]
        u = (
            noise[a * group : b * group].view(b - a, group).float() * (1 / 256) + 0.5 / 256
            if noise is not None
            else 0.5
        )
        codes[a * group // per : b * group // per] = _pack_float((v + u).floor(), bits)
        if mask is not None:
            mask[a * group // 8 : b * group // 8] = _pack_float((g[a:b] != 0).float(), 1)
    return codes, mask


def dequantize(p: Packed) -> torch.Tensor:
    codes, meta = p.tensors[:2]
    mask = p.tensors[2] if p.zero_exact else None
    lo, sc = meta[0].float(), meta[1].float()  # (G,)
    x = fused.decode(codes, lo, sc, mask, p.bits, p.group, p.dtype) if fused.usable(codes) else None
    if x is None:
        x = _decode_chunks(codes, lo, sc, mask, p.bits, p.group, p.dtype)
    return x[: p.shape.numel()].view(p.shape)


def _decode_chunks(codes: torch.Tensor, lo: torch.Tensor, sc: torch.Tensor, mask: torch.Tensor | None, bits: int,
                   group: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    per = 8 // bits
    out = torch.empty(lo.numel() * group, dtype=dtype, device=codes.device)  # (G * group,)
    for a, b in _chunks(lo.numel(), codes):
        q = _unpack_float(codes[a * group // per : b * group // per], bits).view(b - a, group)
        x = (lo[a:b, None] + q * sc[a:b, None]).view(-1)  # (c * group,)
        if mask is not None:
            x = _apply_mask(x, mask[a * group // 8 : b * group // 8])
        out[a * group : b * group] = x
    return out


def _apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact zeros where the mask says so; elsewhere at least the smallest positive float, so the
    sign a ReLU's backward reads is exact (the shift is 1e-38: no bias worth the name)."""
    return torch.where(unpack_mask(mask, x.shape), x.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def similar(
    x: torch.Tensor, bits: int = 2, group: int = 256, block: int = 4, stochastic: bool = True, zero_exact: bool = False
) -> Packed:
    """Base + delta: `block` neighbours share an 8-bit base (their mean); deltas at `bits` bits;
    a 1-bit mask restores exact zeros. About 8/block + bits + 1 bits an element. `zero_exact`
    (ReLU outputs): non-zeros decode positive, so `decoded > 0` equals `x > 0`."""
    g = _groups(x, block).float()  # (B, block): runs of neighbours along the last axis
    base = g.mean(dim=1)  # (B,)
    pb = quantize(base, 8, max(1, group // block), stochastic)
    delta = g - dequantize(pb).float()[:, None]  # (B, block)
    pd = quantize(delta, bits, group, stochastic)
    mask = pack_mask(g != 0)
    return Packed("similar", x.shape, x.dtype, (*pb.tensors, *pd.tensors, mask), bits, group, block, zero_exact)


def unsimilar(p: Packed) -> torch.Tensor:
    bc, bm, dc, dm, mask = p.tensors
    n = p.shape.numel()
    n_blocks = -(-n // p.block)
    base = dequantize(Packed("quant", torch.Size([n_blocks]), torch.float32, (bc, bm), 8, max(1, p.group // p.block)))
    delta = dequantize(Packed("quant", torch.Size([n_blocks, p.block]), torch.float32, (dc, dm), p.bits, p.group))
    x = (base[:, None] + delta).reshape(-1)  # (n_blocks * block,)
    x = _apply_mask(x, mask) if p.zero_exact else torch.where(unpack_mask(mask, x.shape), x, 0.0)
    return x[:n].view(p.shape).to(p.dtype)


def encode(x: torch.Tensor, scheme: str, bits: int, group: int, stochastic: bool = True, zero_exact: bool = False):
    """Compress `x` with a scheme ('quant' or 'similar'); returns a `Packed`."""
    if scheme == "similar":
        return similar(x, bits, group, stochastic=stochastic, zero_exact=zero_exact)
    return quantize(x, bits, group, stochastic, zero_exact)


def decode(p: Packed) -> torch.Tensor:
    return unsimilar(p) if p.scheme == "similar" else dequantize(p)
