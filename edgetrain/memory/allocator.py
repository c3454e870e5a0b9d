"""Allocator models: from a step's tensor events to the memory the device must really hold.

- `cuda-caching`: a replay of PyTorch's CUDA caching allocator (512 B rounding, 2 MiB small-pool
  segments, 20 MiB large-pool segments, best-fit with block splitting, nothing returned to
  the driver during a step). Its peak reserved bytes is what `nvidia-smi` and an OOM see.
- `cpu-malloc`: glibc malloc with edgetrain's policy (`pin_malloc_policy`): allocations of
  128 KiB and more are mmap-backed and go back to the OS when freed, so the process holds its
  tensors' peak plus a small, calibrated workspace. Without the policy glibc raises its mmap
  threshold after the first large free and keeps freed activations in the heap (measured here:
  10-20% more peak RSS, growing with the activations).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
from dataclasses import dataclass

from edgetrain.memory.tracker import MemoryReport

KiB, MiB = 2**10, 2**20
_SMALL, _SMALL_SEG, _LARGE_SEG, _MIN_LARGE_SPLIT = 1 * MiB, 2 * MiB, 20 * MiB, 1 * MiB
MMAP_THRESHOLD = 128 * KiB


def cuda_round(nbytes: int) -> int:
    """Block size the caching allocator hands out for a request of `nbytes`."""
    return 512 if nbytes < 512 else -(-nbytes // 512) * 512


@dataclass
class _Segment:
    size: int
    blocks: list[list[int]]  # [offset, size, free(0/1)], sorted by offset


class CachingAllocatorModel:
    """Replays allocations and frees; tracks reserved (segment) bytes like the CUDA allocator."""

    def __init__(self) -> None:
        self.pools: dict[bool, list[_Segment]] = {True: [], False: []}
        self.reserved = 0
        self.peak_reserved = 0
        self._where: dict[int, tuple[_Segment, int]] = {}  # handle -> (segment, offset)

    def malloc(self, handle: int, nbytes: int) -> None:
        size = cuda_round(nbytes)
        small = size <= _SMALL
        best: tuple[int, _Segment, int] | None = None
        for seg in self.pools[small]:
            for i, (_, bsize, free) in enumerate(seg.blocks):
                if free and bsize >= size and (best is None or bsize < best[0]):
                    best = (bsize, seg, i)
        if best is None:
            seg_size = _SMALL_SEG if small else (_LARGE_SEG if size < 10 * MiB else -(-size // (2 * MiB)) * 2 * MiB)
            seg = _Segment(seg_size, [[0, seg_size, 1]])
            self.pools[small].append(seg)
            self.reserved += seg_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            best = (seg_size, seg, 0)
        bsize, seg, i = best
        off = seg.blocks[i][0]
        rest = bsize - size
        if rest >= (512 if small else _MIN_LARGE_SPLIT):
            seg.blocks[i] = [off, size, 0]
            seg.blocks.insert(i + 1, [off + size, rest, 1])
        else:
            seg.blocks[i][2] = 0
        self._where[handle] = (seg, off)

    def free(self, handle: int) -> None:
        seg, off = self._where.pop(handle)
        i = bisect.bisect_left([b[0] for b in seg.blocks], off)
        seg.blocks[i][2] = 1
        if i + 1 < len(seg.blocks) and seg.blocks[i + 1][2]:  # merge with the next free block
            seg.blocks[i][1] += seg.blocks.pop(i + 1)[1]
        if i > 0 and seg.blocks[i - 1][2]:  # and with the previous one
            seg.blocks[i - 1][1] += seg.blocks.pop(i)[1]


def replay_cuda(report: MemoryReport, categories: tuple[str, ...] | None = None) -> int:
    """Peak reserved bytes of the caching allocator over a tracked step's events (of the records
    in `categories` only, if given)."""
    model = CachingAllocatorModel()
    for delta, rid, _ in report.events:
        if categories is not None and report.categories[rid] not in categories:
            continue
        if delta > 0:
            model.malloc(rid, report.sizes[rid])
        else:
            model.free(rid)
    return model.peak_reserved


def device_peak_bytes(report: MemoryReport, allocator: str, workspace: int) -> int:
    """Memory the device must hold for the step's tensors under `allocator`, plus workspace."""
    if allocator == "cuda-caching":
        return replay_cuda(report) + workspace
    return max(report.peak_bytes, report.within_op_peak_bytes) + workspace  # CPU: oneDNN's inner copies too


def pin_malloc_policy(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so freed tensors return to the OS (no-op off glibc).

    glibc otherwise raises the threshold to the size of each freed mmap chunk (up to 32 MiB)
    and then serves activations from the heap, which it keeps: the process's peak grows by
    what the step freed, not what it held. Returns whether the policy is in force.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False
