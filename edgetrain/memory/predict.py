"""A prepared model's training step: its peak memory, predicted without allocating it.

Memory applies nothing: the model comes with its methods already applied (planning's
`estimate` prepares it). The step runs once under `FakeTensorMode` with the memory tracker on top (tensor level:
exactly the bytes a real step would hold), then the device's allocator model and its fixed
overheads turn that into what the device must have (device level) and what the process
shows (process level: RSS on a CPU or a Jetson, reserved + context on a discrete GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.memory.allocator import device_peak_bytes
from edgetrain.memory.measure import tracked_step
from edgetrain.memory.tracker import MemoryReport


@dataclass(frozen=True)
class Prediction:
    """One step's predicted peak at three levels: tensors (what the tracker counts), device (the
    allocator model and workspace on top: what the budget is compared with) and process (plus the
    fixed overheads: what the OOM killer or nvidia-smi sees)."""

    peak_total_bytes: int
    peak_device_bytes: int
    peak_process_bytes: int
    saved_activation_bytes: int
    peak_by_category: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    peak_op: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Prediction:
        """From `to_dict`'s form (a plan file); unknown keys are a `TypeError` for the caller to word."""
        return cls(**doc)


def summarize(report: MemoryReport, profile: DeviceProfile | None, unseen: int = 0) -> Prediction:
    """Tensor-, device- and process-level figures of one tracked step; `unseen`: bytes held at the
    peak that fake tensors cannot see (a method's own state, given by its handler)."""
    allocator = profile.allocator if profile else "cpu-malloc"
    workspace = profile.workspace_bytes if profile else 0
    device_peak = device_peak_bytes(report, allocator, workspace) + unseen
    overhead = _process_overhead(profile)
    return Prediction(
        peak_total_bytes=report.peak_bytes + unseen,
        peak_device_bytes=device_peak,
        peak_process_bytes=device_peak + overhead,
        saved_activation_bytes=report.saved_activation_bytes,
        peak_by_category={**report.peak_by_category, **({"unseen": unseen} if unseen else {})},
        peak_phase=report.peak_phase,
        peak_op=report.peak_op,
    )


def _process_overhead(profile: DeviceProfile | None) -> int:
    """Fixed bytes beyond the tensors in what the process level measures: the CUDA context on a
    discrete GPU; the framework too where CPU and GPU share one memory (CPU, Jetson)."""
    if profile is None:
        return 0
    keys = ("cuda_context",) if profile.kind == "cuda" else ("framework", "cuda_context")
    return sum(v for k, v in profile.reserved_bytes.items() if k in keys)


def predict_step(model: nn.Module, spec: StepSpec, profile: DeviceProfile | None, name: str = "model", unseen: int = 0):
    """(tracked report, tensor/device/process figures) of one steady-state step of a prepared model.
    A step of many equal micro-batches is run as two or three of them (`fewer_micro_batches`)."""
    run, held = fewer_micro_batches(spec)
    report = fake_step(model, run, name, held)
    return report, summarize(report, profile, unseen)


def fewer_micro_batches(spec: StepSpec) -> tuple[StepSpec, int | None]:
    """The step to run for `spec`, and the batch its input must hold. From the second micro-batch
    on, each holds what the one before held (the gradients exist; the rest repeats) until the last,
    which differs only with an optimizer step in backward: k > 2 equal micro-batches are run as two
    (the first, the last) on 2/k of an input of the whole batch, or with the step in backward as
    three (one in the middle too). The peak is the same to the byte (tests/memory/test_predict.py);
    planning weighs up to 64 micro-batches, and an exact check of a split runs a third less."""
    k, b = spec.settings.micro_batches, spec.batch_size
    n = 3 if spec.settings.step_in_backward else 2
    if k <= n or b % k:
        return spec, None
    run = dataclasses.replace(spec, batch_size=n * b // k, settings=dataclasses.replace(spec.settings, micro_batches=n))
    return run, b


def fake_step(model: nn.Module, spec: StepSpec, name: str = "model", held_batch: int | None = None) -> MemoryReport:
    """One tracked step under fake tensors; shape problems come back as one line (ConfigError)."""
    try:
        with quiet_fake_tensor_log():
            return tracked_step(model, spec, fake=True, held_batch=held_batch)
    except RuntimeError as e:
        if "too small" in str(e) or "size" in str(e).lower() and "output" in str(e).lower():
            s = spec.input_shape[-1]
            raise ConfigError(
                f"input size {s} is too small for {name}'s downsampling: use -s {min_input_size(model)[0]} or more"
            ) from None
        raise
    except ValueError as e:
        if "more than 1 value per channel" in str(e):
            raise ConfigError(
                f"batch {spec.batch_size} at {spec.input_shape[-1]}px leaves BatchNorm one value per channel: "
                "use a batch of 2 or more, or a larger input"
            ) from None
        raise


@contextlib.contextmanager
def quiet_fake_tensor_log():
    """Fake tensors log a traceback before re-raising shape errors; we report them in one line."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level, log.level = log.level, logging.CRITICAL
    try:
        yield
    finally:
        log.setLevel(level)


_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # not adaptive pooling: its output side is fixed
_MIN_SIZES: dict[tuple, tuple[int, int]] = {}


def min_input_size(model: nn.Module, channels: int = 3, probe: int = 224) -> tuple[int, int]:
    """(smallest input side the model can learn from, its downsampling factor): the factor is the
    probe side over the smallest feature map a fake forward pass makes; below 8 px an image holds
    too little whatever the model. Cached by the spatial layers' geometry (the planner asks often)."""
    key = (channels, probe, *((type(m).__name__, str(getattr(m, "stride", "")), str(getattr(m, "kernel_size", "")),
                               str(getattr(m, "padding", ""))) for m in model.modules() if isinstance(m, _SPATIAL)))  # fmt: skip
    if key not in _MIN_SIZES:
        _MIN_SIZES[key] = _probe_min_size(model, channels, probe)
    return _MIN_SIZES[key]


def _probe_min_size(model: nn.Module, channels: int, probe: int) -> tuple[int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edgetrain.memory.measure import fake_copy

    mode = FakeTensorMode()
    m = fake_copy(model, mode).eval()
    sides: list[int] = []
    hook = lambda mod, inp, out: sides.append(min(out.shape[-2:]))  # noqa: E731
    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, _SPATIAL)]
    try:
        with quiet_fake_tensor_log(), mode, torch.no_grad():
            m(torch.empty(1, channels, probe, probe))
    except RuntimeError:
        return 8, 1
    finally:
        for h in handles:
            h.remove()
    factor = probe // max(1, min(sides, default=probe))
    return max(8, factor), factor


def check_input_size(model: nn.Module, size: int, name: str, channels: int = 3) -> None:
    """Refuse an input side below what the model can learn from (`min_input_size`), in one line."""
    smallest, factor = min_input_size(model, channels)
    if size < smallest:
        why = (
            f"for {name}'s downsampling ({factor}x)" if factor >= smallest else "(below 8 px an image holds too little)"
        )
        raise ConfigError(f"input size {size} is too small {why}: use -s {smallest} or more")


def check_args(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    if len(input_shape) != 3 or any(d < 1 for d in input_shape):
        raise ConfigError(f"input shape must be (channels, height, width) with positive sizes, got {input_shape}")


def check_budget(model: nn.Module, budget: int, profile: DeviceProfile) -> None:
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if params > budget:
        mib = 2**20
        raise BudgetError(
            f"the parameters alone take {params / mib:.0f} MiB, more than {profile.name}'s budget of "
            f"{budget / mib:.0f} MiB: use a smaller model or a low-rank method"
        )


def num_classes_of(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return (last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels) if last else 10
