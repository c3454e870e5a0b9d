"""Step-wide methods: mixed precision (autocast) and micro-batching with accumulation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

from edgetrain.core.step import PRECISIONS, StepSettings
from edgetrain.devices.profile import DeviceProfile
from edgetrain.methods.base import MethodConfig, MethodHandler, StepEffect, register_method

MAX_MICRO_BATCHES = 64  # the finest split the planner tries


@dataclass(frozen=True)
class PrecisionConfig(MethodConfig):
    """Autocast to bf16 or fp16 (fp16 with loss scaling); saved activations shrink by half."""

    name: ClassVar[str] = "precision"
    risk: ClassVar[int] = 1
    help: ClassVar[str] = "bf16/fp16 autocast for the whole step (fp16 with a GradScaler)"
    spec_keys: ClassVar[tuple[str, ...]] = ("dtype",)
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS or self.dtype == "fp32":
            raise ValueError(f"dtype must be bf16 or fp16, got {self.dtype!r}")


# Accuracy risk by the images one micro-batch holds, where BatchNorm normalizes over them alone. cifar_resnet20 on
# digits, batch 64, 3 seeds, against plain (bench/levers.txt): 16 images +0.28 points, 8 -0.46, 4 +0.19 (seed noise,
# the rank lossy micro-batches always had), 2 images -1.02 (between 2-bit's 4 and low-rank layers' 6), 1 image -21.2
# (the rank above any change of the layers).
MICRO_RISK = ((4, 2), (2, 5), (1, 8))  # (at least this many images, risk), first match


def micro_batch_risk(images: int) -> int:
    """The accuracy risk of micro-batches of `images` each under BatchNorm (0: not known, the
    middle rank)."""
    if images <= 0:
        return 2
    return next(r for least, r in MICRO_RISK if images >= least)


@dataclass(frozen=True)
class MicrobatchConfig(MethodConfig):
    """Split each batch into `micro_batches` chunks and accumulate gradients.

    The effective batch (and the gradient, up to float rounding) is kept; BatchNorm sees
    each micro-batch alone, so its statistics are per micro-batch: the fewer images each holds,
    the more accuracy it risks (`images`, known once the batch is: not part of the spec).
    """

    name: ClassVar[str] = "microbatch"
    help: ClassVar[str] = "split the batch and accumulate gradients (BatchNorm stats per micro-batch)"
    spec_keys: ClassVar[tuple[str, ...]] = ("micro_batches",)
    micro_batches: int = 2
    images: int = field(default=0, compare=False, metadata={"spec": False})

    @property
    def risk(self) -> int:  # type: ignore[override]
        return micro_batch_risk(self.images)

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")


class PrecisionHandler(MethodHandler):
    config_type = PrecisionConfig
    plan_scope = "step"

    def step_candidates(self, profile: DeviceProfile, batch_size: int) -> list[MethodConfig]:
        """bf16 where the device has it, else fp16 where it is clearly faster than fp32."""
        if profile.bf16_supported:
            return [PrecisionConfig("bf16")]
        return [PrecisionConfig("fp16")] if profile.fp16_gflops > 1.2 * profile.fp32_gflops else []

    def step_effect(
        self, config: MethodConfig, profile: DeviceProfile, has_batchnorm: bool, batch_size: int
    ) -> StepEffect:
        half = profile.fp16_gflops or profile.fp32_gflops
        return StepEffect(
            activation_scale=0.5,
            param_copies=0.5,  # each weight cast once per forward, the copy saved for backward
            time_factor=0.5 + 0.5 * profile.fp32_gflops / half,  # the compute share speeds up, traffic halves
            risk=config.risk,
            reason=f"{config.dtype}: the device computes it faster and saved activations halve",  # type: ignore[attr-defined]
        )

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return replace(settings, precision=config.dtype)  # type: ignore[attr-defined]


class MicrobatchHandler(MethodHandler):
    config_type = MicrobatchConfig
    plan_scope = "step"

    def step_candidates(self, profile: DeviceProfile, batch_size: int) -> list[MethodConfig]:
        top = int(math.log2(min(batch_size, MAX_MICRO_BATCHES)))
        return [self.at_batch(MicrobatchConfig(2**i), batch_size) for i in range(1, top + 1)]

    def at_batch(self, config: MethodConfig, batch_size: int) -> MethodConfig:
        return replace(config, images=max(1, batch_size // config.micro_batches))  # type: ignore[attr-defined]

    def step_effect(
        self, config: MethodConfig, profile: DeviceProfile, has_batchnorm: bool, batch_size: int
    ) -> StepEffect:
        config = self.at_batch(config, batch_size)
        k, images = config.micro_batches, config.images  # type: ignore[attr-defined]
        return StepEffect(
            batch_divisor=k,
            time_factor=1 + 0.03 * math.log2(k),
            risk=config.risk if has_batchnorm else 0,  # BatchNorm sees 1/k of the batch
            reason=f"{k} micro-batches: activations of 1/{k} of the batch at a time"
            + (f"; BatchNorm normalizes over {images} image{'s' * (images > 1)}" if has_batchnorm else ""),
        )

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return replace(settings, micro_batches=config.micro_batches)  # type: ignore[attr-defined]


register_method(PrecisionHandler())
register_method(MicrobatchHandler())
