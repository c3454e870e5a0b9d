"""`estimate`: a training step's peak memory, predicted without allocating it.

The step runs once under `FakeTensorMode` with the memory tracker on top (tensor level:
exactly the bytes a real step would hold), then the device's allocator model and its fixed
overheads turn that into what the device must have (device level) and what the process
shows (process level: RSS on a CPU or a Jetson, reserved + context on a discrete GPU).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgetrain.devices.profile import DeviceProfile
from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.memory.allocator import device_peak_bytes
from edgetrain.memory.measure import StepSpec, tracked_step
from edgetrain.memory.tracker import MemoryReport
from edgetrain.methods.base import MethodConfig, prepare


@dataclass
class Estimate:
    """Predicted (and, with `measure=True`, measured) memory of one training step."""

    model: str
    input_shape: tuple[int, int, int]
    batch_size: int
    optimizer: str
    device: str | None
    methods: list[str]
    predicted: dict[str, Any]
    budget_bytes: int | None = None
    measured: dict[str, Any] | None = None
    report: MemoryReport | None = field(default=None, repr=False)

    @property
    def fits(self) -> bool | None:
        if self.budget_bytes is None:
            return None
        return self.predicted["peak_device_bytes"] <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "report"}
        out["input_shape"] = list(self.input_shape)
        out["fits"] = self.fits
        return out


def estimate(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    optimizer: str = "sgd",
    device: DeviceProfile | str | None = None,
    methods: list[MethodConfig | str] = (),  # type: ignore[assignment]
    num_classes: int | None = None,
    name: str = "model",
) -> Estimate:
    """Predict the peak memory of one steady-state training step of `model` (nothing allocated)."""
    profile = get_device(device) if device is not None else None
    _check_args(model, input_shape, batch_size)
    budget = profile.usable_memory_bytes if profile else None
    if profile is not None:
        _check_budget(model, budget, profile)
    prepared, configs, settings = prepare(model, list(methods), shapes_only=True)
    spec = StepSpec(tuple(input_shape), batch_size, num_classes or _num_classes(model), optimizer, settings)
    report = _fake_step(prepared, spec, name)
    predicted = summarize(report, profile)
    return Estimate(
        name, tuple(input_shape), batch_size, optimizer, profile.name if profile else None,
        [c.name for c in configs], predicted, budget, report=report,
    )  # fmt: skip


def summarize(report: MemoryReport, profile: DeviceProfile | None) -> dict[str, Any]:
    """Tensor-, device- and process-level figures of one tracked step."""
    allocator = profile.allocator if profile else "cpu-malloc"
    workspace = profile.workspace_bytes if profile else 0
    device_peak = device_peak_bytes(report, allocator, workspace)
    overhead = _process_overhead(profile)
    return {
        "peak_total_bytes": report.peak_bytes,
        "peak_device_bytes": device_peak,
        "peak_process_bytes": device_peak + overhead,
        "saved_activation_bytes": report.saved_activation_bytes,
        "peak_by_category": report.peak_by_category,
        "peak_phase": report.peak_phase,
        "peak_op": report.peak_op,
    }


def _process_overhead(profile: DeviceProfile | None) -> int:
    """Fixed bytes beyond the tensors in what the process level measures: the CUDA context on a
    discrete GPU; the framework too where CPU and GPU share one memory (CPU, Jetson)."""
    if profile is None:
        return 0
    keys = ("cuda_context",) if profile.kind == "cuda" else ("framework", "cuda_context")
    return sum(v for k, v in profile.reserved_bytes.items() if k in keys)


def _fake_step(model: nn.Module, spec: StepSpec, name: str) -> MemoryReport:
    try:
        with _quiet_fake_tensor_log():
            return tracked_step(model, spec, fake=True)
    except RuntimeError as e:
        if "too small" in str(e) or "size" in str(e).lower() and "output" in str(e).lower():
            s = spec.input_shape[-1]
            raise ConfigError(
                f"input size {s} is too small for {name}'s downsampling: use -s {_min_size(model, spec)} or more"
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
def _quiet_fake_tensor_log():
    """Fake tensors log a traceback before re-raising shape errors; we report them in one line."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level, log.level = log.level, logging.CRITICAL
    try:
        yield
    finally:
        log.setLevel(level)


def _min_size(model: nn.Module, spec: StepSpec) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edgetrain.memory.measure import fake_copy

    mode = FakeTensorMode()
    m = fake_copy(model, mode).eval()
    for s in (2**k for k in range(3, 12)):
        try:
            with _quiet_fake_tensor_log(), mode, torch.no_grad():
                m(torch.empty(1, spec.input_shape[0], s, s))
            return s
        except RuntimeError:
            continue
    return 2048


def _check_args(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    if len(input_shape) != 3 or any(d < 1 for d in input_shape):
        raise ConfigError(f"input shape must be (channels, height, width) with positive sizes, got {input_shape}")


def _check_budget(model: nn.Module, budget: int, profile: DeviceProfile) -> None:
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if params > budget:
        mib = 2**20
        raise BudgetError(
            f"the parameters alone take {params / mib:.0f} MiB, more than {profile.name}'s budget of "
            f"{budget / mib:.0f} MiB: use a smaller model or a low-rank method"
        )


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return (last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels) if last else 10
