"""Choosing methods for a device: `plan_for` searches (`search.py`), `Plan` records the answer
(`record.py`), `apply_plan_` applies it in place. `edgetrain.plan(model, ...)` is `plan_for`."""

from edgetrain.planning.record import PLAN_VERSION, Choices, Plan, PlanRequest, apply_plan_
from edgetrain.planning.search import estimate_plan, plan_for

__all__ = ["PLAN_VERSION", "Choices", "Plan", "PlanRequest", "apply_plan_", "estimate_plan", "plan_for"]
