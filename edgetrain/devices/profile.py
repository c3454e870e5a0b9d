"""`DeviceProfile`: what edgetrain knows about a device, loaded from and saved to YAML."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgetrain.errors import ProfileError

KINDS = ("cuda", "jetson", "cpu")
ALLOCATORS = ("cuda-caching", "cpu-malloc")
SOURCES = ("spec", "calibrated")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class DeviceProfile:
    """A device as the memory model and the planner see it. All sizes in bytes."""

    # --- identity
    name: str
    kind: str  # cuda | jetson | cpu
    description: str = ""
    # --- memory
    total_memory_bytes: int = 0  # physical memory the accelerator (or the board) has
    reserved_bytes: dict[str, int] = field(default_factory=dict)  # context, framework, OS, ...
    usable_memory_bytes: int = 0  # what a training step's tensors may use: total - reserved
    unified_memory: bool = False  # CPU and GPU share one memory (Jetson)
    allocator: str = "cpu-malloc"  # cuda-caching | cpu-malloc: how bytes become reserved memory
    workspace_bytes: int = 0  # conv library workspace and untracked runtime buffers
    # --- compute
    fp32_gflops: float = 0.0  # dense matmul/conv throughput
    fp16_gflops: float = 0.0
    bf16_supported: bool = False
    memory_bandwidth_gbs: float = 0.0
    compute_capability: str | None = None  # "5.3" on a Jetson Nano; None on a CPU
    # --- software known to run there
    software: dict[str, str] = field(default_factory=dict)  # jetpack, cuda, torch
    # --- provenance
    source: str = "spec"  # spec (datasheets) | calibrated (measured)
    reference: str = ""  # datasheet named, or "host@date" of the calibration
    path: str | None = field(default=None, compare=False)  # the file it came from
    # reserved sizes written `auto` and not yet measured on this host (see `with_reserved`)
    auto_reserved: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        where = self.path or self.name
        _check(where, "kind", self.kind in KINDS, f"one of {', '.join(KINDS)}", self.kind)
        _check(where, "memory.allocator", self.allocator in ALLOCATORS, f"one of {ALLOCATORS}", self.allocator)
        _check(where, "provenance.source", self.source in SOURCES, f"one of {SOURCES}", self.source)
        _check(where, "memory.total", self.total_memory_bytes > 0, "a positive size", self.total_memory_bytes)
        ok = 0 < self.usable_memory_bytes <= self.total_memory_bytes
        _check(where, "memory.usable", ok, "a positive size no larger than memory.total", self.usable_memory_bytes)
        _check(where, "compute.fp32_gflops", self.fp32_gflops > 0, "a positive number", self.fp32_gflops)

    def with_reserved(self, sizes: dict[str, int]) -> DeviceProfile:
        """This profile with its `auto` reserved sizes filled in from `sizes` (measured above)."""
        filled = {k: int(sizes[k]) for k in self.auto_reserved}
        return dataclasses.replace(self, reserved_bytes={**self.reserved_bytes, **filled}, auto_reserved=())

    @property
    def reserved_total_bytes(self) -> int:
        return sum(self.reserved_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        """The nested YAML layout (sizes as exact byte counts)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "memory": {
                "total": self.total_memory_bytes,
                "usable": self.usable_memory_bytes,
                "reserved": {**self.reserved_bytes, **{k: "auto" for k in self.auto_reserved}},
                "unified": self.unified_memory,
                "allocator": self.allocator,
                "workspace": self.workspace_bytes,
            },
            "compute": {
                "fp32_gflops": self.fp32_gflops,
                "fp16_gflops": self.fp16_gflops,
                "bf16_supported": self.bf16_supported,
                "bandwidth_gbs": self.memory_bandwidth_gbs,
                "compute_capability": self.compute_capability,
            },
            "software": dict(self.software),
            "provenance": {"source": self.source, "reference": self.reference},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> DeviceProfile:
        return dataclasses.replace(self, **changes)


def parse_size(value: Any, where: str = "", key: str = "") -> int:
    """'4GiB', '300 MiB', '1.5GB' or an int -> bytes."""
    if isinstance(value, bool):
        raise ProfileError(f"{where}: field '{key}' must be a size like 4GiB, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ProfileError(f"{where}: field '{key}' must be a size like 4GiB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def profile_from_dict(data: Any, where: str) -> DeviceProfile:
    """Validate the nested layout and build the profile; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping with name, kind, memory, compute; got {type(data).__name__}")
    mem, comp = _section(data, "memory", where), _section(data, "compute", where)
    prov = data.get("provenance") or {}
    total = _resolve_auto(_need(mem, "total", where, "memory."), where, "memory.total")
    usable = _resolve_auto(_need(mem, "usable", where, "memory."), where, "memory.usable")
    reserved = mem.get("reserved") or {}
    if not isinstance(reserved, dict):
        raise ProfileError(f"{where}: field 'memory.reserved' must map names to sizes, e.g. cuda_context: 300MiB")
    auto = tuple(k for k, v in reserved.items() if k in AUTO_RESERVED and v == "auto")
    cached = cached_overheads() if auto else {}
    auto = tuple(k for k in auto if k not in cached)
    return DeviceProfile(
        name=str(_need(data, "name", where)),
        kind=str(_need(data, "kind", where)),
        description=str(data.get("description", "")),
        total_memory_bytes=total,
        usable_memory_bytes=usable,
        reserved_bytes={
            k: cached[k] if v == "auto" and k in cached else _reserved_size(k, v, where)
            for k, v in reserved.items()
            if k not in auto
        },  # fmt: skip
        unified_memory=bool(mem.get("unified", False)),
        allocator=str(mem.get("allocator", "cpu-malloc")),
        workspace_bytes=parse_size(mem.get("workspace", 0), where, "memory.workspace"),
        fp32_gflops=_number(_need(comp, "fp32_gflops", where, "compute."), where, "compute.fp32_gflops"),
        fp16_gflops=_number(comp.get("fp16_gflops", 0), where, "compute.fp16_gflops"),
        bf16_supported=bool(comp.get("bf16_supported", False)),
        memory_bandwidth_gbs=_number(comp.get("bandwidth_gbs", 0), where, "compute.bandwidth_gbs"),
        compute_capability=None if comp.get("compute_capability") is None else str(comp["compute_capability"]),
        software={str(k): str(v) for k, v in (data.get("software") or {}).items()},
        source=str(prov.get("source", "spec")),
        reference=str(prov.get("reference", "")),
        path=where,
        auto_reserved=auto,
    )


def load_profile(path: str | Path) -> DeviceProfile:
    """Read one profile YAML; any problem is a `ProfileError` naming the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ProfileError(f"{path}: not valid YAML{at}: fix the syntax or re-run `edgetrain profile --save`") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a text file, so no profile: re-run `edgetrain profile --save`") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot be read ({e.strerror}): give a profile YAML file") from None
    return profile_from_dict(data, str(path))


def _section(data: dict, key: str, where: str) -> dict:
    sec = _need(data, key, where)
    if not isinstance(sec, dict):
        raise ProfileError(f"{where}: field '{key}' must be a mapping, got {type(sec).__name__}")
    return sec


def _need(d: dict, key: str, where: str, prefix: str = "") -> Any:
    if key not in d or d[key] is None:
        raise ProfileError(f"{where}: field '{prefix}{key}' is missing: {_EXPECT.get(prefix + key, 'required')}")
    return d[key]


def _number(v: Any, where: str, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProfileError(f"{where}: field '{key}' must be a number, got {v!r}")
    return float(v)


def _resolve_auto(v: Any, where: str, key: str) -> int:
    """`auto` sizes (the generic cpu profile) are read from this host when loaded."""
    if v != "auto":
        return parse_size(v, where, key)
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total) if key.endswith("total") else int(vm.available * 0.8)


def _reserved_size(key: str, v: Any, where: str) -> int:
    if v == "auto":
        raise ProfileError(f"{where}: field 'memory.reserved.{key}' cannot be auto: only {AUTO_RESERVED} are measured")
    return parse_size(v, where, f"memory.reserved.{key}")


AUTO_RESERVED = ("framework",)  # reserved sizes a profile may leave `auto`: measured on this host


def overheads_cache() -> Path:
    """Where this host's measured overheads are kept, per Python and torch version (the probe
    that measures them, `edgetrain.train.calibrate`, writes it; loading a profile only reads it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetrain"
    key = hashlib.sha1(f"{sys.executable}|{torch_version}|2".encode()).hexdigest()[
        :12
    ]  # 2: workspace beyond inner copies
    return base / f"overheads-{key}.json"


def cached_overheads() -> dict[str, int]:
    """This host's measured overheads if a probe has cached them, else {} (nothing is run)."""
    try:
        return {k: int(v) for k, v in json.loads(overheads_cache().read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _check(where: str, key: str, ok: bool, expected: str, got: Any) -> None:
    if not ok:
        raise ProfileError(f"{where}: field '{key}' must be {expected}, got {got!r}")


_EXPECT = {
    "name": "a device name such as jetson-nano",
    "kind": f"one of {', '.join(KINDS)}",
    "memory": "a mapping with total, usable, reserved",
    "compute": "a mapping with fp32_gflops, fp16_gflops, bandwidth_gbs",
    "memory.total": "a size like 4GiB",
    "memory.usable": "a size like 2.5GiB (total minus reserved)",
    "compute.fp32_gflops": "a positive number (GFLOP/s)",
}
