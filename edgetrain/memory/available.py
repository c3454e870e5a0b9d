"""How much memory is really available now, read from the source each platform trusts.

A Jetson's GPU shares RAM with the OS and every other process: what is left is the kernel's
MemAvailable (NVML answers NOT_SUPPORTED there, and `mem_get_info` leaves out reclaimable page
cache). A container is bounded by its cgroup's `memory.max`. A discrete GPU's free memory comes
from NVML, or from `torch.cuda.mem_get_info`. `file:PATH` reads a size (or a meminfo-format file)
that something else writes: a supervisor, or a test. Memory measures: it never re-plans.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetrain.errors import ConfigError, EdgetrainError

SOURCES = ("auto", "meminfo", "cgroup", "nvml", "cuda", "file:PATH", "off")
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class SourceUnreadable(Exception):
    """A source that cannot be read here; its text says why."""


@dataclass(frozen=True)
class MemorySource:
    """`read()` -> bytes available to new allocations now. `level`: "host" (RAM: what a process's
    RSS comes out of; a Jetson's GPU too) or "device" (a discrete GPU's own memory)."""

    name: str
    read: Callable[[], int]
    level: str = "host"


def meminfo_available(path: Path = MEMINFO) -> int:
    """MemAvailable of a meminfo-format file, in bytes."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SourceUnreadable(f"{path} cannot be read ({e.strerror})") from None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.M)
    if not m:
        raise SourceUnreadable(f"{path} has no MemAvailable line")
    return int(m.group(1)) * 1024


def cgroup_available(root: Path = CGROUP) -> int:
    """memory.max - memory.current of this process's cgroup (v2); unreadable when unbounded."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text())
    except (OSError, ValueError) as e:
        raise SourceUnreadable(f"cgroup memory files under {root} cannot be read ({e})") from None
    if limit == "max":
        raise SourceUnreadable("this cgroup has no memory limit (memory.max is 'max')")
    return max(0, int(limit) - current)


def file_available(path: Path) -> int:
    """A file holding a size ('1.5GiB', '800MiB', a byte count) or meminfo-format lines."""
    from edgetrain.devices.profile import parse_size

    try:
        text = path.read_text().strip()
    except OSError as e:
        raise SourceUnreadable(f"{path} cannot be read ({e.strerror})") from None
    if "MemAvailable:" in text:
        return meminfo_available(path)
    try:
        return parse_size(text, str(path), "available")
    except EdgetrainError:
        raise SourceUnreadable(f"{path} holds {text[:40]!r}, not a size like 800MiB") from None


def nvml_available(index: int = 0) -> int:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
    except Exception as e:  # noqa: BLE001 - absent, no driver, or NOT_SUPPORTED (Jetson)
        raise SourceUnreadable(f"NVML free memory cannot be read ({type(e).__name__}: {e})") from None


def cuda_available() -> int:
    import torch

    if not torch.cuda.is_available():
        raise SourceUnreadable("torch sees no CUDA device")
    return int(torch.cuda.mem_get_info()[0])


def _host() -> MemorySource:
    """MemAvailable, bounded by the cgroup's limit where there is one (a container)."""

    def read() -> int:
        try:
            bound = cgroup_available()
        except SourceUnreadable:
            return meminfo_available()
        return min(meminfo_available(), bound)

    return MemorySource("meminfo", read)


def named_source(spec: str) -> MemorySource:
    """The source `spec` names (not read yet); an unknown name is one line."""
    if spec.startswith("file:") and len(spec) > 5:
        path = Path(spec[5:])
        return MemorySource(spec, lambda: file_available(path))
    table = {
        "meminfo": lambda: _host(),
        "cgroup": lambda: MemorySource("cgroup", cgroup_available),
        "nvml": lambda: MemorySource("nvml", nvml_available, "device"),
        "cuda": lambda: MemorySource("cuda", cuda_available, "device"),
    }
    if spec not in table:
        raise ConfigError(f"--memory-source {spec!r} is not a source: use one of {', '.join(SOURCES)}")
    return table[spec]()


def auto_sources(kind: str, on_gpu: bool) -> list[str]:
    """What to watch, best first: a discrete GPU's own free memory when training runs on it, else
    the host's RAM (a CPU, a Jetson's shared memory, a host that plays a device under the guard)."""
    return ["nvml", "cuda", "meminfo"] if kind == "cuda" and on_gpu else ["meminfo"]


def open_source(spec: str, kind: str, on_gpu: bool, warn: Callable[[str], None]) -> MemorySource | None:
    """The source to watch, read once to check it. A source named by the user that cannot be read
    is a `ConfigError` (one line naming it, and what would be used instead); with `auto` each one
    that fails is passed over with a line through `warn`. None: `off`."""
    if spec == "off":
        return None
    if spec != "auto":
        source = named_source(spec)
        try:
            source.read()
        except SourceUnreadable as e:
            fallback = auto_sources(kind, on_gpu)[-1]
            raise ConfigError(f"--memory-source {spec}: {e}: use --memory-source auto (watches {fallback} here) "
                              "or off") from None  # fmt: skip
        return source
    names = auto_sources(kind, on_gpu)
    for i, name in enumerate(names):
        source = named_source(name)
        try:
            source.read()
            return source
        except SourceUnreadable as e:
            instead = names[i + 1] if i + 1 < len(names) else "nothing (memory pressure is not watched)"
            warn(f"edgetrain fit: {e}: watching {instead} instead")
    return None
