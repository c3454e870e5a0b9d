"""Calibration that runs a training step: the framework's fixed cost (RSS after importing torch,
in a fresh process), the runtime workspace beyond the tensors (a small real step in a fresh
process), and `profile_device`, which puts them together with the device's own probes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime

import psutil
import torch

from edgetrain.devices.calibrate import (
    SAFETY,
    MiB,
    bandwidth_gbs,
    conv_gflops,
    matmul_gflops,
    probe_usable_bytes,
)  # fmt: skip
from edgetrain.devices.detect import Detected, detect
from edgetrain.devices.profile import DeviceProfile, cached_overheads, overheads_cache
from edgetrain.devices.store import get_device
from edgetrain.train.probe import measure_in_subprocess

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

# What is left beyond tensors and ops' inner copies varies with the step: 28-46 MiB over 46 steps on
# the CPU host (bench/memory_grid.txt); one small step is measured, so the spread is added: errs high.
WORKSPACE_SPREAD = 20 * MiB

# A small real step measured by the same fresh-process probe as `estimate --measure`.
_WORKSPACE_STEP = {
    "model": "cifar_resnet8",
    "num_classes": 10,
    "input_shape": [3, 64, 64],
    "batch_size": 64,
    "optimizer": "sgd",
}


def measure_overheads() -> dict[str, int]:
    """Framework RSS, runtime workspace (peak RSS beyond framework, tensors and ops' inner copies) and, with a GPU,
    the CUDA context, each measured in a fresh process (so nothing else counts)."""
    m = measure_in_subprocess(_WORKSPACE_STEP)
    held = max(m["peak_total_bytes"], m.get("within_op_peak_bytes", 0))  # tensors and ops' inner copies
    rest = max(0, m["peak_rss_bytes"] - m["framework_bytes"] - held)
    out = {"framework": m["framework_bytes"], "workspace": rest + WORKSPACE_SPREAD}
    if torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-c", _CONTEXT_SCRIPT], capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            out["cuda_context"] = int(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


# Fresh-process readings of the framework's RSS spread by ~10 MiB on a loaded host (706-717 MiB here);
# one low reading, cached, made predictions of planned steps fall under the RSS they meant to bound.
READINGS = 2


def measured_overheads() -> dict[str, int]:
    """`measure_overheads`, the largest of `READINGS` readings per figure (a prediction must not err
    low), cached per Python and torch version (`devices.profile.overheads_cache`)."""
    over = cached_overheads()
    if over:
        return over
    readings = [measure_overheads() for _ in range(READINGS)]
    over = {k: max(r.get(k, 0) for r in readings) for k in readings[0]}
    path = overheads_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(over))
    os.replace(tmp, path)
    return over


def resolve_profile(device: DeviceProfile | str) -> DeviceProfile:
    """The device's profile with its `auto` reserved sizes measured on this host (once, cached)."""
    profile = get_device(device)
    return profile.with_reserved(measured_overheads()) if profile.auto_reserved else profile


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
