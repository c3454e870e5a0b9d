"""Codecs for saved activations, bit-packed into uint8 storage (the bytes kept are the bytes counted).

- `quantize`: per-group min/max to 1..8 bits with stochastic rounding (unbiased w.r.t. the
  stored min and scale, which are rounded outwards to bf16 so that no value is clipped).
- `similar`: Facto-CNN's value similarity read as base + delta: each run of `block` neighbouring
  values (along W) shares one 8-bit base (its mean); only the small differences are kept, at
  `bits` bits, plus a 1-bit mask that restores exact zeros (ReLU outputs).
- `pack_mask`: a boolean map at 1 bit per element (what a ReLU's backward needs).

Every codec is plain torch ops (CPU and CUDA, no toolchain) and runs under fake tensors, so the
predictor measures the packed sizes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

META_DTYPE = torch.bfloat16  # min and scale per group: 4 bytes a group


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits (numel a multiple of 8 // bits) -> uint8 with 8 // bits codes a byte."""
    if bits == 8:
        return q.reshape(-1)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)  # (per,)
    return (q.reshape(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)  # codes do not overlap: sum == or


def unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 codes, flat."""
    if bits == 8:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    return ((p.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)


def pack_mask(m: torch.Tensor) -> torch.Tensor:
    """A boolean tensor at 1 bit per element (padded to a whole byte)."""
    flat = m.reshape(-1).to(torch.uint8)
    return pack_bits(F.pad(flat, (0, (-flat.numel()) % 8)), 1)


def unpack_mask(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = shape.numel()
    return unpack_bits(p, 1)[:n].view(shape).bool()


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
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, group)  # (G, group)


def quantize(x: torch.Tensor, bits: int, group: int = 256, stochastic: bool = True, zero_exact: bool = False) -> Packed:
    """Per-group min/max quantization. `zero_exact`: in groups whose min is 0 (ReLU outputs), positive
    values keep a code >= 1, so `decoded > 0` equals `x > 0` exactly (what ReLU's backward reads)."""
    levels = 2**bits - 1
    g = _groups(x, group)  # (G, group)
    lo, hi = g.amin(dim=1), g.amax(dim=1)  # (G,)
    lo_b, sc_b = _round_out(lo, hi - lo, levels)
    v = (g - lo_b.float()[:, None]) / sc_b.float()[:, None]
    v = v + (torch.rand_like(v) if stochastic else 0.5)
    q = v.floor_().clamp_(0, levels)
    if zero_exact:
        q = torch.where((g > 0) & (lo_b == 0)[:, None], q.clamp(min=1), q)
    codes = pack_bits(q.to(torch.uint8), bits)
    meta = torch.stack([lo_b, sc_b])  # (2, G) bf16
    return Packed("quant", x.shape, x.dtype, (codes, meta), bits, group)


def dequantize(p: Packed) -> torch.Tensor:
    codes, meta = p.tensors
    q = unpack_bits(codes, p.bits).view(-1, p.group).float()  # (G, group)
    x = meta[0].float()[:, None] + q * meta[1].float()[:, None]
    return x.reshape(-1)[: p.shape.numel()].view(p.shape).to(p.dtype)


def similar(
    x: torch.Tensor, bits: int = 2, group: int = 256, block: int = 4, stochastic: bool = True, zero_exact: bool = False
) -> Packed:
    """Base + delta: `block` neighbours share an 8-bit base (their mean); deltas at `bits` bits;
    a 1-bit mask restores exact zeros. About 8/block + bits + 1 bits an element. `zero_exact`
    (ReLU outputs): non-zeros decode positive, so `decoded > 0` equals `x > 0`."""
    g = _groups(x, block)  # (B, block): runs of neighbours along the last axis
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
    if p.zero_exact:
        x = x.clamp_min(torch.finfo(torch.float32).tiny)
    x = torch.where(unpack_mask(mask, x.shape), x, 0.0)
    return x[:n].view(p.shape).to(p.dtype)


def encode(x: torch.Tensor, scheme: str, bits: int, group: int, stochastic: bool = True, zero_exact: bool = False):
    """Compress `x` with a scheme ('quant' or 'similar'); returns a `Packed`."""
    if scheme == "similar":
        return similar(x, bits, group, stochastic=stochastic, zero_exact=zero_exact)
    return quantize(x, bits, group, stochastic, zero_exact)


def decode(p: Packed) -> torch.Tensor:
    return unsimilar(p) if p.scheme == "similar" else dequantize(p)
