"""edgetrain: make CNN training fit on small GPUs and Jetson boards.

Profile a device, predict a training step's memory, pick the memory-saving methods that fit,
train with them, and export for on-device fine-tuning.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

# The public API, imported on first use: `import edgetrain` stays light (no torch), so the
# on-device runtime (`edgetrain.runtime`, `edgetrain finetune`) runs where only onnxruntime is.
_LAZY = {
    "DeviceProfile": "edgetrain.devices.profile", "load_profile": "edgetrain.devices.profile",
    "get_device": "edgetrain.devices.store", "list_devices": "edgetrain.devices.store",
    "BudgetError": "edgetrain.errors", "ConfigError": "edgetrain.errors", "EdgeOOMError": "edgetrain.errors",
    "EdgetrainError": "edgetrain.errors", "ProfileError": "edgetrain.errors",
    "BudgetGuard": "edgetrain.memory.guard", "Estimate": "edgetrain.memory.predict",
    "estimate": "edgetrain.memory.predict", "MemoryTracker": "edgetrain.memory.tracker",
    "apply_method_": "edgetrain.methods.base", "list_methods": "edgetrain.methods.base",
    "parse_spec": "edgetrain.methods.base", "create_model": "edgetrain.models", "list_models": "edgetrain.models",
    "Plan": "edgetrain.plan", "apply_plan_": "edgetrain.plan",
}  # fmt: skip

if TYPE_CHECKING:
    from edgetrain import plan  # noqa: F401 - callable: edgetrain.plan(model, ...)
    from edgetrain.devices.profile import DeviceProfile


def __getattr__(name: str) -> Any:
    if name == "plan":  # the callable package: edgetrain.plan(model, input_shape, batch_size, device=...)
        return importlib.import_module("edgetrain.plan")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgetrain' has no attribute {name!r}")


def profile_device(name: str | None = None, quick: bool = False) -> DeviceProfile:
    """Detect and calibrate this machine (see `edgetrain.devices.calibrate`)."""
    from edgetrain.devices.calibrate import profile_device as _profile

    return _profile(name=name, quick=quick)


__all__ = [
    "BudgetError", "BudgetGuard", "ConfigError", "DeviceProfile", "EdgeOOMError", "EdgetrainError", "Estimate",
    "MemoryTracker", "Plan", "ProfileError", "apply_method_", "apply_plan_", "plan", "create_model", "estimate", "get_device", "list_devices",
    "list_methods", "list_models", "load_profile", "parse_spec", "profile_device",
]  # fmt: skip
