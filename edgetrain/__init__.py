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
    "list_devices": "edgetrain.devices.store",
    "BudgetError": "edgetrain.errors", "ConfigError": "edgetrain.errors", "EdgeOOMError": "edgetrain.errors",
    "EdgetrainError": "edgetrain.errors", "ProfileError": "edgetrain.errors",
    "BudgetGuard": "edgetrain.memory.guard", "Estimate": "edgetrain.planning.estimate",
    "pin_malloc_policy": "edgetrain.memory.allocator",
"MemoryTracker": "edgetrain.memory.tracker",
    "apply_method_": "edgetrain.methods.base", "list_methods": "edgetrain.methods.base",
    "parse_spec": "edgetrain.methods.base", "create_model": "edgetrain.models", "list_models": "edgetrain.models",
    "Plan": "edgetrain.planning", "apply_plan_": "edgetrain.planning",
}  # fmt: skip

if TYPE_CHECKING:
    from edgetrain.devices.profile import DeviceProfile
    from edgetrain.planning.estimate import Estimate
    from edgetrain.planning.record import Plan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgetrain' has no attribute {name!r}")


def get_device(name: DeviceProfile | str) -> DeviceProfile:
    """A device profile by name or path, its `auto` sizes measured on this host (once, cached)."""
    from edgetrain.train.calibrate import resolve_profile

    return resolve_profile(name)


def estimate(model: Any, input_shape: tuple[int, int, int], batch_size: int, optimizer: str = "sgd",
             device: DeviceProfile | str | None = None, *args: Any, **kwargs: Any) -> Estimate:  # fmt: skip
    """A step's peak memory with methods applied, predicted (`edgetrain.planning.estimate`)."""
    from edgetrain.planning.estimate import estimate as _estimate

    return _estimate(model, input_shape, batch_size, optimizer, device and get_device(device), *args, **kwargs)


def plan(model: Any, input_shape: tuple[int, int, int], batch_size: int, device: DeviceProfile | str = "cpu",
         *args: Any, **kwargs: Any) -> Plan:  # fmt: skip
    """The least-cost configuration that fits the device (`edgetrain.planning.plan_for`)."""
    from edgetrain.planning import plan_for

    return plan_for(model, input_shape, batch_size, get_device(device), *args, **kwargs)


def profile_device(name: str | None = None, quick: bool = False) -> DeviceProfile:
    """Detect and calibrate this machine (see `edgetrain.devices.calibrate`)."""
    from edgetrain.train.calibrate import profile_device as _profile

    return _profile(name=name, quick=quick)


__all__ = [
    "BudgetError", "BudgetGuard", "ConfigError", "DeviceProfile", "EdgeOOMError", "EdgetrainError", "Estimate",
    "MemoryTracker", "Plan", "ProfileError", "apply_method_", "apply_plan_", "plan", "create_model", "estimate", "get_device", "list_devices",
    "list_methods", "list_models", "load_profile", "parse_spec", "profile_device",
]  # fmt: skip
