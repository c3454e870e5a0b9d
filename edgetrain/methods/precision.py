"""Step-wide methods: mixed precision (autocast) and micro-batching with accumulation."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from edgetrain.core.step import PRECISIONS, StepSettings
from edgetrain.methods.base import MethodConfig, MethodHandler, register_method


@dataclass(frozen=True)
class PrecisionConfig(MethodConfig):
    """Autocast to bf16 or fp16 (fp16 with loss scaling); saved activations shrink by half."""

    name: ClassVar[str] = "precision"
    risk: ClassVar[int] = 1
    help: ClassVar[str] = "bf16/fp16 autocast for the whole step (fp16 with a GradScaler)"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS or self.dtype == "fp32":
            raise ValueError(f"dtype must be bf16 or fp16, got {self.dtype!r}")


@dataclass(frozen=True)
class MicrobatchConfig(MethodConfig):
    """Split each batch into `micro_batches` chunks and accumulate gradients.

    The effective batch (and the gradient, up to float rounding) is kept; BatchNorm sees
    each micro-batch alone, so its statistics are per micro-batch.
    """

    name: ClassVar[str] = "microbatch"
    risk: ClassVar[int] = 2
    help: ClassVar[str] = "split the batch and accumulate gradients (BatchNorm stats per micro-batch)"
    micro_batches: int = 2

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")


class PrecisionHandler(MethodHandler):
    config_type = PrecisionConfig

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return replace(settings, precision=config.dtype)  # type: ignore[attr-defined]


class MicrobatchHandler(MethodHandler):
    config_type = MicrobatchConfig

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return replace(settings, micro_batches=config.micro_batches)  # type: ignore[attr-defined]


register_method(PrecisionHandler())
register_method(MicrobatchHandler())
