"""`estimate`: a training step's peak memory with methods applied, predicted without allocating it.

Planning's entry to memory: it prepares the model (methods applied to shapes only, no weights
decomposed), then memory predicts the prepared step (`memory.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.devices.store import get_device
from edgetrain.memory.measure import model_counts, shell_copy
from edgetrain.memory.predict import (
    Prediction,
    check_args,
    check_budget,
    check_input_size,
    num_classes_of,
    predict_step,
)
from edgetrain.memory.tracker import MemoryReport
from edgetrain.methods.base import MethodConfig, as_config, handler_for, prepare


@dataclass
class Estimate:
    """Predicted memory of one training step (and, from `estimate --measure`, `host_check`: the step
    measured on this machine beside this machine's own prediction; see train/validate.host_check)."""

    model: str
    input_shape: tuple[int, int, int]
    batch_size: int
    optimizer: str
    device: str | None
    methods: list[str]
    predicted: Prediction
    budget_bytes: int | None = None
    host_check: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)  # methods dropped: no eligible layer (skip_unused)
    counts: dict[str, int] = field(default_factory=dict)  # parameters, trainable, forward FLOPs a sample
    plain_counts: dict[str, int] | None = None  # the same of the model without the methods
    report: MemoryReport | None = field(default=None, repr=False)

    @property
    def fits(self) -> bool | None:
        if self.budget_bytes is None:
            return None
        return self.predicted.peak_device_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "report"}
        out["predicted"] = self.predicted.to_dict()
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
    counts: bool = True,
) -> Estimate:
    """Predict the peak memory of one steady-state training step of `model` (nothing allocated).
    A method that finds no eligible layer is refused (`UnusedMethod`), or dropped with `skip_unused`.
    `counts`: also count parameters and FLOPs (two fake forwards more; the planner's checks skip them)."""
    profile = get_device(device) if device is not None else None
    check_args(model, input_shape, batch_size)
    check_input_size(model, input_shape[-1], name, input_shape[0])
    budget = profile.usable_memory_bytes if profile else None
    if profile is not None:
        check_budget(model, budget, profile)
    unused = "drop" if skip_unused else "error"
    copied = shell_copy(model) if methods else model  # the methods change layers, never a weight: none is copied
    prepared, configs, settings = prepare(copied, list(methods), True, shapes_only=True, unused=unused, name=name)
    spec = StepSpec(tuple(input_shape), batch_size, num_classes or num_classes_of(model), optimizer, settings)
    unseen = sum(handler_for(c).unseen_bytes(prepared, c) for c in configs)
    report, predicted = predict_step(prepared, spec, profile, name, unseen)
    skipped = [m if isinstance(m, str) else m.name for m in methods
               if as_config(m).for_shapes() not in configs]  # fmt: skip
    return Estimate(
        name, tuple(input_shape), batch_size, optimizer, profile.name if profile else None,
        [c.name for c in configs], predicted, budget, skipped=skipped, report=report,
        counts=model_counts(prepared, tuple(input_shape)) if counts else {},
        plain_counts=model_counts(model, tuple(input_shape)) if configs and counts else None,
    )  # fmt: skip
