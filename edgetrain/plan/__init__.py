"""Choosing methods for a device. For now a cost-ordered ladder (`choose`); see simple.py."""

from edgetrain.plan.simple import Choice, choose, load_plan, save_plan

__all__ = ["Choice", "choose", "load_plan", "save_plan"]
