"""The device's own probes: the memory a process can really allocate (chunk by chunk, never
past what is available, everything released), matmul and conv throughput, memory bandwidth.
What needs a training step (framework cost, workspace) and the whole profile are measured one
layer up, in `edgetrain.train.calibrate`."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import torch

MiB = 2**20
SAFETY = 0.9  # fraction of the probed memory a plan may use


def probe_usable_bytes(
    available: int,
    device: str = "cpu",
    cap: int | None = None,
    chunk: int = 256 * MiB,
    margin: int | None = None,
    host_available: Callable[[], int] | None = None,
) -> int:
    """Allocate and touch chunks until `available` less a safety `margin` (default: a tenth, at
    least 512 MiB) or `cap` is reached, allocation fails, or, where the probe takes host memory,
    the host's available memory falls to the margin (another process is allocating): probing to
    the limit on a board would make the OOM killer take other processes."""
    margin = max(512 * MiB, available // 10) if margin is None else margin
    limit = min(available - margin, cap or available)
    if host_available is None and device == "cpu":
        host_available = lambda: psutil.virtual_memory().available  # noqa: E731
    held, total = [], 0
    try:
        while total + chunk <= limit:
            if host_available is not None and host_available() - chunk < margin:
                break
            t = torch.empty(chunk // 4, dtype=torch.float32, device=device)
            t.fill_(1.0)  # touch the pages: untouched memory is not really had
            held.append(t)
            total += chunk
    except (RuntimeError, MemoryError):
        pass
    finally:
        del held
        if device != "cpu":
            torch.cuda.empty_cache()
    return total


def matmul_gflops(device: str = "cpu", n: int = 1024, repeat: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, device, repeat) / 1e9


def conv_gflops(device: str = "cpu", repeat: int = 5) -> float:
    """Median GFLOP/s of a 3x3, 64->64 channel convolution on (16, 64, 56, 56)."""
    x = torch.randn(16, 64, 56, 56, device=device)  # (N, C, H, W)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    flops = 2 * 16 * 64 * 64 * 9 * 56 * 56
    with torch.no_grad():
        return flops / _median_time(lambda: conv(x), device, repeat) / 1e9


def bandwidth_gbs(device: str = "cpu", nbytes: int = 256 * MiB, repeat: int = 5) -> float:
    """Median copy bandwidth (read + write) in GB/s."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), device, repeat) / 1e9


def _median_time(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
