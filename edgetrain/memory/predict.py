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
from edgetrain.memory.measure import StepSpec, model_counts, tracked_step
from edgetrain.memory.tracker import MemoryReport
from edgetrain.methods.base import MethodConfig, parse_spec, prepare


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
    skipped: list[str] = field(default_factory=list)  # methods dropped: no eligible layer (skip_unused)
    counts: dict[str, int] = field(default_factory=dict)  # parameters, trainable, forward FLOPs a sample
    plain_counts: dict[str, int] | None = None  # the same of the model without the methods
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
    skip_unused: bool = False,
) -> Estimate:
    """Predict the peak memory of one steady-state training step of `model` (nothing allocated).
    A method that finds no eligible layer is refused (`UnusedMethod`), or dropped with `skip_unused`."""
    profile = get_device(device) if device is not None else None
    _check_args(model, input_shape, batch_size)
    check_input_size(model, input_shape[-1], name, input_shape[0])
    budget = profile.usable_memory_bytes if profile else None
    if profile is not None:
        _check_budget(model, budget, profile)
    unused = "drop" if skip_unused else "error"
    prepared, configs, settings = prepare(model, list(methods), shapes_only=True, unused=unused, name=name)
    spec = StepSpec(tuple(input_shape), batch_size, num_classes or _num_classes(model), optimizer, settings)
    report = _fake_step(prepared, spec, name)
    predicted = summarize(report, profile)
    skipped = [m if isinstance(m, str) else m.name for m in methods
               if (parse_spec(m) if isinstance(m, str) else m).for_shapes() not in configs]  # fmt: skip
    return Estimate(
        name, tuple(input_shape), batch_size, optimizer, profile.name if profile else None,
        [c.name for c in configs], predicted, budget, skipped=skipped, report=report,
        counts=model_counts(prepared, tuple(input_shape)),
        plain_counts=model_counts(model, tuple(input_shape)) if configs else None,
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
def _quiet_fake_tensor_log():
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
        with _quiet_fake_tensor_log(), mode, torch.no_grad():
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
