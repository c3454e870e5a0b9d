"""The memory/time trade-off of one planning question: for every step-wide setting allowed and a
sweep of budgets from the lightest reachable peak to plain's, the least-cost plan the planner's
model finds, its modelled device peak and step time; the Pareto front among them (no other plan
is both lighter and faster). Knapsack solves only: no fake step beyond the planner's own."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetrain.planning.planner import Planner

BUDGETS = 12  # budgets swept per step-wide setting (geometric, lightest to plain)


def frontier(planner: Planner, budgets: int = BUDGETS) -> list[dict[str, Any]]:
    """Candidate plans as {plan, peak_device_bytes, time_factor, risk, front, choices}, lightest
    first; each distinct plan once (at its least modelled peak); `choices` applies it (`Choices(**c)`)."""
    lo = min(planner.device_bytes(planner.least_peak(g)) for g in planner.settings())
    hi = planner.plain.predicted.peak_device_bytes
    points: dict[str, dict[str, Any]] = {"plain": {"plan": "plain", "peak_device_bytes": hi, "time_factor": 1.0, "choices": {},
                                                    "risk": 0, "front": False}}  # fmt: skip
    for g in planner.settings():
        for budget in np.geomspace(max(lo, 1), max(hi, lo + 1), budgets):
            got = planner.solve(g, int(budget))
            if got is None:
                continue
            chosen, _, factor = got
            choices = planner.to_choices(g, chosen)
            peak = planner.device_bytes(planner.modelled_peak(g, chosen))
            label = choices.summary() if not choices.is_plain else "plain"
            risk = max([0, *(int(c.risk) for c in choices.configs())])
            if label not in points or peak < points[label]["peak_device_bytes"]:
                points[label] = {"plan": label, "peak_device_bytes": peak, "time_factor": round(factor, 4),
                                 "risk": risk, "front": False, "choices": choices.to_dict()}  # fmt: skip
    rows = sorted(points.values(), key=lambda r: (r["peak_device_bytes"], r["time_factor"]))
    best = float("inf")
    for r in rows:  # lightest first: on the front when faster than every lighter plan
        if r["time_factor"] < best:
            r["front"], best = True, r["time_factor"]
    return rows
