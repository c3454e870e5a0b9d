"""Choosing methods for a device: `edgetrain.plan(model, ...)` searches (`search.plan`), `Plan`
holds the answer, `apply_plan_` applies it in place.

The package itself is callable, so `edgetrain.plan(model, input_shape, batch_size, device=...)`
reads as the one verb it is while `edgetrain.plan.Plan` and friends stay importable.
"""

import sys
import types

from edgetrain.plan.plan import PLAN_VERSION, Plan, apply_plan_
from edgetrain.plan.search import estimate_plan
from edgetrain.plan.search import plan as plan_for


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Plan:
        return plan_for(*args, **kwargs)

    __call__.__doc__ = plan_for.__doc__


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["PLAN_VERSION", "Plan", "apply_plan_", "estimate_plan", "plan_for"]
