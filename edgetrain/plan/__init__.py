"""Choosing methods for a device. For now a cost-ordered ladder (`choose`); see simple.py."""

from edgetrain.plan.simple import Choice, choose

__all__ = ["Choice", "choose"]
