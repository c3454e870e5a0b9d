"""The optimizer step fused into backward: each parameter is updated as soon as its gradient is
complete, and the gradient is freed, so the step never holds every gradient at once.

Exact for SGD (momentum, weight decay) and AdamW: each parameter's update reads only its own
gradient and state (edgetrain has no global gradient clipping). With micro-batches the gradients
accumulate as before and the updates happen during the last micro-batch's backward. fp16 (loss
scaling looks at every gradient before any step) is refused. The step itself lives in the core
step (`StepSettings.step_in_backward`); this file makes it a method the planner can weigh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from edgetrain.core.step import StepSettings
from edgetrain.devices.profile import DeviceProfile
from edgetrain.methods.base import MethodConfig, MethodHandler, StepEffect, register_method

TIME_FACTOR = 1.01  # one optimizer call per parameter: a little Python per tensor


@dataclass(frozen=True)
class StepInBackwardConfig(MethodConfig):
    """Update each parameter in backward as soon as its gradient is ready; free the gradient."""

    name: ClassVar[str] = "step-in-backward"
    risk: ClassVar[int] = 0
    help: ClassVar[str] = "optimizer step fused into backward: gradients freed as they are used (exact)"


class StepInBackwardHandler(MethodHandler):
    replicas_ok = False  # it steps as each local gradient completes, before DDP has averaged it
    config_type = StepInBackwardConfig
    plan_scope = "step"

    def step_candidates(self, profile: DeviceProfile, batch_size: int) -> list[MethodConfig]:
        return [StepInBackwardConfig()]

    def step_effect(
        self, config: MethodConfig, profile: DeviceProfile, has_batchnorm: bool, batch_size: int
    ) -> StepEffect:
        return StepEffect(
            gradient_scale=0.0,
            step_temps=0.0,  # each parameter is stepped beside its own gradient (AdamW's in 2^20-element views)
            time_factor=TIME_FACTOR,
            reason="step-in-backward: each gradient is applied and freed as soon as it is complete",
        )

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return replace(settings, step_in_backward=True)


register_method(StepInBackwardHandler())
