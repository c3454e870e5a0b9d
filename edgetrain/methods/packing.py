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
    """A boolean tensor at 1 bit per element (padded to a whole byte)."""
    flat = m.reshape(-1).float()
    return _pack_float(F.pad(flat, (0, (-flat.numel()) % 8)), 1)


def unpack_mask(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = shape.numel()
    return _unpack_float(p, 1)[:n].view(shape).bool()


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


def uniform_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """U[0, 1) in steps of 1/256, centred (k + 0.5) / 256: seven random bytes from every 64-bit draw,
    3.5x cheaper than `torch.rand` on a CPU. Stochastic rounding with it is biased by at most
    1/512 of a quantization step."""
    n = shape.numel()
    r = torch.empty(-(-n // 7), dtype=torch.int64, device=device).random_()  # [0, 2**63): 7 full bytes each
    u8 = r.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[:n]  # little-endian: the top byte is dropped
    return u8.float().add_(0.5).mul_(1 / 256).view(shape)


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
    """Per-group min/max quantization. `zero_exact` (ReLU outputs): a 1-bit mask of the non-zeros
    rides along, so `decoded > 0` equals `x > 0` exactly (what ReLU's backward reads) while the
    values stay unbiased (forcing positives to code >= 1 instead biased the mean: +42 % at 2 bits)."""
    levels = 2**bits - 1
    g = _groups(x, group)  # (G, group)
    lo, hi = torch.aminmax(g, dim=1)  # (G,)
    lo_b, sc_b = _round_out(lo, hi - lo, levels)
    inv = 1.0 / sc_b.float()
    v = torch.addcmul((-lo_b.float() * inv)[:, None], g, inv[:, None])  # (G, group) in [0, levels]
    # noise lies in [1/512, 1 - 1/512] and v in [0, levels] (bounds rounded outwards): no clamp needed
    v.add_(uniform_noise(v.shape, v.device) if stochastic else 0.5).floor_()
    codes = _pack_float(v, bits)
    meta = torch.stack([lo_b, sc_b])  # (2, G) bf16
    mask = (pack_mask(g != 0),) if zero_exact else ()
    return Packed("quant", x.shape, x.dtype, (codes, meta, *mask), bits, group, zero_exact=zero_exact)


def dequantize(p: Packed) -> torch.Tensor:
    codes, meta = p.tensors[:2]
    q = _unpack_float(codes, p.bits).view(-1, p.group)  # (G, group)
    x = torch.addcmul(meta[0].float()[:, None], q, meta[1].float()[:, None]).reshape(-1)  # (G * group,)
    if p.zero_exact:
        x = _apply_mask(x, p.tensors[2])
    return x[: p.shape.numel()].view(p.shape).to(p.dtype)


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
    x = _apply_mask(x, mask) if p.zero_exact else torch.where(unpack_mask(mask, x.shape), x, 0.0)
    return x[:n].view(p.shape).to(p.dtype)


def encode(x: torch.Tensor, scheme: str, bits: int, group: int, stochastic: bool = True, zero_exact: bool = False):
    """Compress `x` with a scheme ('quant' or 'similar'); returns a `Packed`."""
    if scheme == "similar":
        return similar(x, bits, group, stochastic=stochastic, zero_exact=zero_exact)
    return quantize(x, bits, group, stochastic, zero_exact)


def decode(p: Packed) -> torch.Tensor:
    return unsimilar(p) if p.scheme == "similar" else dequantize(p)
