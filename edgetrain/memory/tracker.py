"""Live-tensor memory tracker: the one way edgetrain measures memory, real or fake.

A `TorchDispatchMode` sees every op's outputs; each new storage is counted until its Python
object dies (a weakref callback). The same tracker runs over real tensors (measurement) and
over `FakeTensorMode` tensors (prediction), so both count exactly the same things.

Categories are given after the fact, when the step knows what a storage turned out to be:
parameters (and buffers), gradients, optimizer state, saved activations (what the autograd
graph still holds when the forward pass ends), inputs, and temporaries (everything else).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgetrain.errors import EdgeOOMError

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "inputs", "temporaries")
ACTIVATION_MEMORY = ("activations", "temporaries")  # what grows with batch and depth


@dataclass
class _Record:
    nbytes: int
    category: str
    phase: str
    op: str


@dataclass
class MemoryReport:
    """What one tracked region used: the peak, when it happened, and its make-up."""

    peak_bytes: int
    peak_phase: str
    peak_op: str
    peak_by_category: dict[str, int]
    saved_activation_bytes: int
    events: list[tuple[int, int, str]] = field(repr=False)  # (nbytes +/-, record id, phase)
    categories: list[str] = field(repr=False)  # category of each record id
    sizes: list[int] = field(repr=False)  # bytes of each record id
    within_op_peak_bytes: int = 0  # live bytes plus what an op holds inside itself (`op_transient`), at most
    within_op: str = "-"  # the op where that happened

    def timeline(self) -> tuple[list[int], dict[str, list[int]]]:
        """Live bytes by category after every event: (event index, {category: bytes})."""
        live = dict.fromkeys(CATEGORIES, 0)
        series: dict[str, list[int]] = {c: [] for c in CATEGORIES}
        for delta, rid, _ in self.events:
            live[self.categories[rid]] += delta
            for c in CATEGORIES:
                series[c].append(live[c])
        return list(range(len(self.events))), series

    def peak_of(self, categories: tuple[str, ...]) -> int:
        """Highest live bytes of the given categories together (e.g. activation memory)."""
        live, best = 0, 0
        for delta, rid, _ in self.events:
            if self.categories[rid] in categories:
                live += delta
                best = max(best, live)
        return best

    def peak_in(self, phases: tuple[str, ...]) -> int:
        """Highest live bytes (every category) while one of `phases` runs."""
        live, best = 0, 0
        for delta, _, ph in self.events:
            live += delta
            if ph in phases:
                best = max(best, live)
        return best

    def rise_in(self, phase: str) -> int:
        """How far live bytes rose above where they stood when `phase` first began, within its
        first span (e.g. the optimizer step's own temporaries); 0 when the phase did not run."""
        live, start, best = 0, None, 0
        for delta, _, ph in self.events:
            if ph == phase and start is None:
                start = live
            elif ph != phase and start is not None:
                break
            live += delta
            if start is not None:
                best = max(best, live - start)
        return best

    def phase_spans(self) -> list[tuple[str, int, int]]:
        """(phase, first event, last event) for each contiguous phase, for plots."""
        spans: list[tuple[str, int, int]] = []
        for i, (_, _, ph) in enumerate(self.events):
            if spans and spans[-1][0] == ph:
                spans[-1] = (ph, spans[-1][1], i)
            else:
                spans.append((ph, i, i))
        return spans


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes by category; optionally raises `EdgeOOMError` past a budget.

    `round_to` models an allocator's granularity (512 for CUDA's caching allocator): each
    storage then counts as its size rounded up, which is what the device has to find.
    """

    def __init__(self, budget_bytes: int | None = None, round_to: int = 1):
        super().__init__()
        self.budget_bytes = budget_bytes
        self.round_to = max(1, round_to)
        self._refs: dict[int, weakref.ref] = {}  # storage key -> weakref keeping the callback
        self._rid: dict[int, int] = {}  # storage key -> record id
        self._records: list[_Record] = []
        self._events: list[tuple[int, int, str]] = []
        self.phase = "setup"
        self._op = "-"
        self.live_bytes = 0
        self._peak = (0, 0)  # (bytes, event index)
        self._saved_max = 0  # most activation bytes held at the end of a forward pass
        self._within = (0, "-")  # (live + an op's inner transient, op) at most

    # --- counting -------------------------------------------------------------------------
    def _size(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to

    def _add(self, t: torch.Tensor, category: str) -> None:
        if t.layout != torch.strided or t.device.type == "meta" and not _is_fake(t):
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._rid:
            return
        n = self._size(st)
        if n == 0:
            return
        rid = len(self._records)
        self._records.append(_Record(n, category, self.phase, self._op))
        self._rid[key] = rid
        self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))
        self._event(n, rid)
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            self._raise_oom(t, n)

    def _free(self, key: int) -> None:
        rid = self._rid.pop(key, None)
        self._refs.pop(key, None)
        if rid is not None:
            self._event(-self._records[rid].nbytes, rid)

    def _event(self, delta: int, rid: int) -> None:
        self._events.append((delta, rid, self.phase))
        self.live_bytes += delta
        if self.live_bytes > self._peak[0]:
            self._peak = (self.live_bytes, len(self._events) - 1)

    def _raise_oom(self, t: torch.Tensor, n: int) -> None:
        mib = 2**20
        raise EdgeOOMError(
            f"out of memory under the budget guard: {self._op} in {self.phase} wanted "
            f"{n / mib:.1f} MiB (tensor {tuple(t.shape)} {t.dtype}) with "
            f"{(self.live_bytes - n) / mib:.1f} MiB live; budget {self.budget_bytes / mib:.1f} MiB",
            live_bytes=self.live_bytes,
            budget_bytes=self.budget_bytes or 0,
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, "temporaries")
        inner = op_transient(func, args, out)
        if inner and self.live_bytes + inner > self._within[0]:
            self._within = (self.live_bytes + inner, self._op)
        return out

    # --- labelling --------------------------------------------------------------------------
    def track(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """Count tensors that exist already (parameters, inputs, optimizer state) or relabel."""
        for t in tensors:
            if t is None:
                continue
            key = t.untyped_storage()._cdata
            if key in self._rid:
                self._records[self._rid[key]].category = category
            else:
                self._add(t, category)

    def label_live(self, category: str, since_phase: str) -> None:
        """Relabel the temporaries allocated in `since_phase` that are still alive."""
        held = 0
        for rid in self._rid.values():
            rec = self._records[rid]
            if rec.category == "temporaries" and rec.phase == since_phase:
                rec.category = category
            held += rec.nbytes if rec.category == category else 0
        if category == "activations":
            self._saved_max = max(self._saved_max, held)

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        prev, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = prev

    def report(self) -> MemoryReport:
        """Peak and its make-up, with categories as finally labelled."""
        peak, at = self._peak
        cats = [r.category for r in self._records]
        by_cat = dict.fromkeys(CATEGORIES, 0)
        for delta, rid, _ in self._events[: at + 1]:
            by_cat[cats[rid]] += delta
        phase = self._events[at][2] if self._events else "setup"
        op = self._records[self._events[at][1]].op if self._events else "-"
        saved = self._saved_max
        sizes = [r.nbytes for r in self._records]
        within = max(self._within[0], peak)
        return MemoryReport(peak, phase, op, by_cat, saved, list(self._events), cats, sizes, within,
                            self._within[1] if self._within[0] > peak else op)  # fmt: skip


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


_CONV, _CONV_BACKWARD = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def op_transient(func, args: tuple, out) -> int:
    """Bytes an op holds inside itself, beyond its outputs, while it runs on a CPU. oneDNN copies a
    convolution's operands into its blocked layout: forward, the larger of input and output;
    backward, the input and the output gradient (depthwise), or the input and the larger of input
    and output gradient (a strided convolution's input gradient is reordered too). BatchNorm's
    backward holds one input-sized buffer. Measured against the CPU allocator with torch.profiler
    (bench/memtracker.py, tests/memory/test_tracker.py). No tensor holds them, so the tracker cannot
    see them; the CPU allocator model adds them (memory/allocator.py)."""
    if func is _CONV:
        return max(_nbytes(args[0]), _nbytes(out))
    if func is _CONV_BACKWARD:
        go, x, groups = _nbytes(args[0]), _nbytes(args[1]), args[-2]
        return x + go if groups > 1 else x + max(x, go)  # a strided conv's input gradient is reordered too
    if func is _BN_BACKWARD:
        return _nbytes(args[1])
    return 0


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
