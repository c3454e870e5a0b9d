"""`profile_device`: detect this machine and measure what the memory model and planner need.

Probes: the memory a training process can really allocate (chunk by chunk, never past what
is available, everything released), the framework's fixed cost (RSS after importing torch,
in a fresh process), the runtime workspace beyond the tensors (a small real training step in a
fresh process), matmul and conv throughput, and memory bandwidth.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

from edgetrain.devices.detect import Detected, detect
from edgetrain.devices.profile import DeviceProfile

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


_CONTEXT_SCRIPT = r"""
import json, psutil, torch
try:  # device memory used before/after creating the context
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    used0 = pynvml.nvmlDeviceGetMemoryInfo(h).used
    torch.zeros(1, device="cuda")
    print(json.dumps(pynvml.nvmlDeviceGetMemoryInfo(h).used - used0))
except Exception:  # NVML absent or NOT_SUPPORTED (Jetson): the process's RSS grows instead
    rss0 = psutil.Process().memory_info().rss
    torch.zeros(1, device="cuda")
    print(json.dumps(psutil.Process().memory_info().rss - rss0))
"""

# A small real step measured by the same fresh-process probe as `estimate --measure`.
_WORKSPACE_STEP = {
    "model": "cifar_resnet8",
    "num_classes": 10,
    "input_shape": [3, 64, 64],
    "batch_size": 64,
    "optimizer": "sgd",
}


def measure_overheads() -> dict[str, int]:
    """Framework RSS, runtime workspace (peak RSS beyond framework and tensors) and, with a GPU,
    the CUDA context, each measured in a fresh process (so nothing else counts)."""
    from edgetrain.memory.probe import measure_in_subprocess

    m = measure_in_subprocess(_WORKSPACE_STEP)
    out = {"framework": m["framework_bytes"],
           "workspace": max(0, m["peak_rss_bytes"] - m["framework_bytes"] - m["peak_total_bytes"])}  # fmt: skip
    if torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-c", _CONTEXT_SCRIPT], capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            out["cuda_context"] = int(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def cached_overheads() -> dict[str, int]:
    """`measure_overheads`, cached per Python and torch version in the user's cache directory."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetrain"
    key = hashlib.sha1(f"{sys.executable}|{torch.__version__}".encode()).hexdigest()[:12]
    path = base / f"overheads-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    over = measure_overheads()
    base.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(over))
    os.replace(tmp, path)
    return over


def profile_device(name: str | None = None, quick: bool = False, detected: Detected | None = None) -> DeviceProfile:
    """Detect and calibrate this machine into a `calibrated` DeviceProfile."""
    det = detected or detect()
    dev = "cuda" if det.kind == "cuda" else "cpu"
    cap = 1024 * MiB if quick else None
    watch = (lambda: psutil.virtual_memory().available) if det.unified or dev == "cpu" else None  # noqa: E731
    probed = probe_usable_bytes(det.available_bytes, dev, cap=cap, host_available=watch)
    # quick: probe 1 GiB to check that allocation works, trust the OS for the rest
    usable_raw = det.available_bytes if quick and probed >= (cap or 0) else probed
    over = measure_overheads()
    reserved = {"framework": over["framework"]}
    if "cuda_context" in over:
        reserved["cuda_context"] = over["cuda_context"]
    # a discrete GPU's probe ran inside a live context; elsewhere the framework shares the memory
    on_device = reserved.get("cuda_context", 0) if det.kind == "cuda" else sum(reserved.values())
    usable = int(min(usable_raw * SAFETY, det.total_bytes - on_device))
    gf = matmul_gflops(dev, 512 if quick else 2048)
    host = socket.gethostname()
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return DeviceProfile(
        name=name or f"{host}-{det.kind}",
        kind=det.kind,
        description=f"{det.name} (calibrated{' quickly' if quick else ''})",
        total_memory_bytes=det.total_bytes,
        reserved_bytes=reserved,
        usable_memory_bytes=max(1, usable),
        unified_memory=det.unified,
        allocator="cuda-caching" if det.kind != "cpu" and torch.cuda.is_available() else "cpu-malloc",
        workspace_bytes=int(over["workspace"]),
        fp32_gflops=round(max(gf, conv_gflops(dev, 3 if quick else 5)), 1),
        fp16_gflops=round(matmul_gflops(dev, 512, dtype=torch.bfloat16 if dev == "cpu" else torch.float16), 1),
        bf16_supported=dev == "cpu" or torch.cuda.is_bf16_supported(),
        memory_bandwidth_gbs=round(bandwidth_gbs(dev, (64 if quick else 256) * MiB), 1),
        compute_capability=det.compute_capability,
        software={"torch": str(torch.__version__), **det.software},
        source="calibrated",
        reference=f"{host}@{when}",
    )
