"""Fused codec kernels: `packing`'s quantize and dequantize as compiled kernels (`torch.compile`:
Inductor's C++ backend on a CPU, Triton on CUDA), one pass over the activation where the eager
codec takes a dozen. They compute what the eager chunks compute, op for op, from the same random
bytes, into tensors of the same shapes: the bytes kept are the same and the codes are equal but for
float contraction at a rounding boundary (one code step, within the codec's error).

A kernel is compiled once per (codec, dtype, device), with the number of groups dynamic, so a new
activation shape costs nothing. `compile_seconds` says what the compiles cost. A compile or run
that fails warns once in one line and leaves that kernel to the eager codec for the process.
The eager codec also runs under fake tensors and under a dispatch mode (the memory tracker), which
compiled code would bypass, and where `EDGETRAIN_FUSED=off` or `set_fused(False)` asks for it.
By default (`auto`) the kernels run on CUDA only: on the 2-core CPU host they were faster than
the eager chunks alone at 4 bits (`bench/codec.txt`) but made whole training steps slower
(resnet18 b32 224 px, `bench/codec.py --steps`: 1.75x / 1.96x plain at 4 / 2 bits with them,
1.63x / 1.56x without), so a CPU asks for them with `EDGETRAIN_FUSED=on`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

MODES = ("auto", "on", "off")  # auto: fused on CUDA; on: on CPUs too
_state = {"mode": os.environ.get("EDGETRAIN_FUSED", "auto")}
if _state["mode"] not in MODES:
    warnings.warn(f"edgetrain: EDGETRAIN_FUSED={_state['mode']!r} is not one of {', '.join(MODES)}; using auto",
                  RuntimeWarning, stacklevel=1)  # fmt: skip
    _state["mode"] = "auto"
_KERNELS: dict[tuple, Callable] = {}
_BROKEN: set[tuple] = set()
compile_seconds: dict[str, float] = {}  # kernel key -> seconds of its first (compiling) call
RECOMPILE_LIMIT = 64  # one code object serves every codec: a kernel per (bits, mask, dtype, device)
TINY = torch.finfo(torch.float32).tiny


def set_fused(on: bool) -> None:
    """Fused kernels wherever they work, CPUs included (`True`), or the eager codec everywhere."""
    _state["mode"] = "on" if on else "off"


def usable(t: torch.Tensor) -> bool:
    """Whether a fused kernel may run on `t`: real values, no dispatch mode watching, not already
    inside a compiled region, and not switched off."""
    devices = ("cuda",) if _state["mode"] == "auto" else ("cpu", "cuda") if _state["mode"] == "on" else ()
    if t.device.type not in devices or torch.compiler.is_compiling():
        return False
    if type(t).__name__ == "FakeTensor" or t.is_meta:
        return False
    return _get_current_dispatch_mode() is None


def encode(g: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, noise: torch.Tensor | None, bits: int,
           zero_exact: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
    """(G, group) values -> (packed codes, packed non-zero mask or None); None when no kernel."""
    key = ("encode", bits, zero_exact, noise is not None, g.dtype, g.device.type)
    args = (g, lo, inv) if noise is None else (g, lo, inv, noise)
    return _run(key, lambda: _encoder(bits, zero_exact, noise is not None), args)


def decode(codes: torch.Tensor, lo: torch.Tensor, sc: torch.Tensor, mask: torch.Tensor | None, bits: int,
           group: int, dtype: torch.dtype) -> torch.Tensor | None:  # fmt: skip
    """Packed codes (and mask) -> (G * group,) values in `dtype`; None when no kernel."""
    key = ("decode", bits, group, mask is not None, dtype, codes.device.type)
    args = (codes, lo, sc) if mask is None else (codes, lo, sc, mask)
    return _run(key, lambda: _decoder(bits, group, mask is not None, dtype), args)


def _run(key: tuple, make: Callable[[], Callable], args: tuple):
    if key in _BROKEN:
        return None
    first = key not in _KERNELS
    if first:
        _KERNELS[key] = torch.compile(make(), dynamic=None)
    for a in args:
        torch._dynamo.maybe_mark_dynamic(a, 0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = _KERNELS[key](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager codec takes over
        _BROKEN.add(key)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        warnings.warn(f"edgetrain: fused codec kernel {key[:4]} failed ({first_line}); using the eager codec",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return None
    if first:
        compile_seconds["/".join(str(k) for k in key)] = round(time.perf_counter() - t0, 2)
    return out


def _encoder(bits: int, zero_exact: bool, stochastic: bool) -> Callable:
    def encode_kernel(g, lo, inv, noise=None):
        v = g.float() * inv[:, None] - lo[:, None] * inv[:, None]  # (G, group) in [0, levels]
        v = (v + (noise.view(g.shape).float() * (1 / 256) + 0.5 / 256 if stochastic else 0.5)).floor()
        codes = pack_rows(v, bits)
        return codes, (pack_rows((g != 0).float(), 1) if zero_exact else None)

    return encode_kernel


def _decoder(bits: int, group: int, masked: bool, dtype: torch.dtype) -> Callable:
    def decode_kernel(codes, lo, sc, mask=None):
        q = unpack_rows(codes, bits).view(-1, group)  # (G, group)
        x = lo[:, None] + q * sc[:, None]  # (G, group)
        if masked:  # rows of 8, a mask byte each
            keep = (mask.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=mask.device)) & 1
            x = torch.where(keep > 0, x.view(-1, 8).clamp_min(TINY), 0.0)  # (G * group / 8, 8)
        return x.reshape(-1).to(dtype)

    return decode_kernel


def pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes in [0, 2**bits) -> uint8, 8 // bits codes a byte, low bits first: a weighted sum
    over each byte's codes (exact in float32; Inductor vectorizes it where shifts on ints it does not)."""
    per = 8 // bits
    if per == 1:
        return v.reshape(-1).to(torch.uint8)
    w = torch.tensor([float(2 ** (bits * i)) for i in range(per)], device=v.device)  # (per,)
    return (v.reshape(-1, per) * w).sum(1).to(torch.uint8)


def unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes -> float codes, flat (the inverse of `pack_rows`)."""
    if bits == 8:
        return p.float()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits  # (per,)
    return ((p.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)).float().reshape(-1)
