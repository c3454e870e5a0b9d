"""What machine is this? A CUDA GPU (torch.cuda + NVML), a Jetson (tegra files + psutil, since
NVML is absent or answers NOT_SUPPORTED there), or a CPU (psutil).

Every outside answer comes through a parameter (`root` for files, `cuda`, `nvml`, `vm`), so
tests can hand in a Jetson's files or a GPU's library answers on a machine that has neither.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class Detected:
    """Raw facts about the machine, before calibration turns them into a profile."""

    kind: str  # cuda | jetson | cpu
    name: str
    total_bytes: int
    available_bytes: int
    unified: bool
    compute_capability: str | None = None
    software: dict[str, str] = field(default_factory=dict)


def detect(root: str | Path = "/", cuda: Any = None, nvml: Any = None, vm: Any = None) -> Detected:
    """Detect the machine. `cuda` defaults to `torch.cuda`, `nvml` to `pynvml`, `vm` to psutil."""
    root = Path(root)
    vm = vm or psutil.virtual_memory
    jetson = _jetson_model(root)
    if jetson:
        return _detect_jetson(root, jetson, vm)
    cuda = cuda if cuda is not None else _torch_cuda()
    if cuda is not None and cuda.is_available():
        return _detect_cuda(cuda, nvml if nvml is not None else _pynvml())
    mem = vm()
    return Detected("cpu", platform.processor() or platform.machine(), int(mem.total), int(mem.available), True)


def _jetson_model(root: Path) -> str | None:
    model = root / "proc/device-tree/model"
    if model.is_file():
        text = model.read_bytes().decode(errors="ignore").strip("\x00\n ")
        if "jetson" in text.lower() or "nvidia" in text.lower():
            return text
    if (root / "etc/nv_tegra_release").is_file():
        return "NVIDIA Jetson (unknown model)"
    return None


def _detect_jetson(root: Path, model: str, vm: Any) -> Detected:
    mem = vm()  # unified memory: the GPU's memory is the system's
    software = {}
    release = root / "etc/nv_tegra_release"
    if release.is_file():
        first = release.read_text(errors="ignore").splitlines()[0] if release.read_text().strip() else ""
        # "# R32 (release), REVISION: 7.4, GCID: ..." -> L4T R32.7.4
        parts = first.replace(",", " ").split()
        if len(parts) > 4 and parts[1].startswith("R"):
            software["l4t"] = f"{parts[1]}.{parts[4]}"
    cc = {"nano": "5.3", "orin": "8.7", "xavier": "7.2", "tx2": "6.2"}
    cap = next((v for k, v in cc.items() if k in model.lower()), None)
    return Detected("jetson", model, int(mem.total), int(mem.available), True, cap, software)


def _detect_cuda(cuda: Any, nvml: Any) -> Detected:
    props = cuda.get_device_properties(0)
    total, free = int(props.total_memory), None
    software = {}
    if nvml is not None:
        try:
            nvml.nvmlInit()
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0))
            total, free = int(info.total), int(info.free)
            software["driver"] = str(nvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001 - NVML answers NOT_SUPPORTED on some boards: fall back
            free = None
    if free is None:
        free = int(cuda.mem_get_info(0)[0])
    cap = f"{props.major}.{props.minor}"
    return Detected("cuda", str(props.name), total, free, bool(getattr(props, "is_integrated", False)), cap, software)


def _torch_cuda() -> Any:
    import torch

    return torch.cuda


def _pynvml() -> Any:
    try:
        import pynvml  # provided by nvidia-ml-py

        return pynvml
    except ImportError:
        return None
