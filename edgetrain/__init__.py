"""edgetrain: make CNN training fit on small GPUs and Jetson boards.

Profile a device, predict a training step's memory, pick the memory-saving methods that fit,
train with them, and export for on-device fine-tuning.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgetrain import plan  # noqa: E402 - callable: edgetrain.plan(model, ...)
from edgetrain.devices.profile import DeviceProfile, load_profile
from edgetrain.devices.store import get_device, list_devices
from edgetrain.errors import BudgetError, ConfigError, EdgeOOMError, EdgetrainError, ProfileError
from edgetrain.memory.guard import BudgetGuard
from edgetrain.memory.predict import Estimate, estimate
from edgetrain.memory.tracker import MemoryTracker
from edgetrain.methods.base import apply_method_, list_methods, parse_spec
from edgetrain.models import create_model, list_models
from edgetrain.plan import Plan, apply_plan_


def profile_device(name: str | None = None, quick: bool = False) -> DeviceProfile:
    """Detect and calibrate this machine (see `edgetrain.devices.calibrate`)."""
    from edgetrain.devices.calibrate import profile_device as _profile

    return _profile(name=name, quick=quick)


__all__ = [
    "BudgetError", "BudgetGuard", "ConfigError", "DeviceProfile", "EdgeOOMError", "EdgetrainError", "Estimate",
    "MemoryTracker", "Plan", "ProfileError", "apply_method_", "apply_plan_", "plan", "create_model", "estimate", "get_device", "list_devices",
    "list_methods", "list_models", "load_profile", "parse_spec", "profile_device",
]  # fmt: skip
