"""A first method selector: try configurations from cheapest to costliest, keep the first that fits.

The ladder (each rung predicted with fake tensors): plain; checkpoint; bf16 where the device
has it; both; then micro-batches of 2, 4, 8, ... on top. When nothing fits it says the smallest
peak it reached, the budget, and what to change. A per-layer search replaces it later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from edgetrain.devices.profile import DeviceProfile
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.memory.predict import Estimate, estimate
from edgetrain.methods.base import parse_spec

PLAN_VERSION = 1


@dataclass
class Choice:
    """The methods chosen, their prediction, and every candidate tried (for the report)."""

    methods: list[str]
    estimate: Estimate
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "device": self.estimate.device, "methods": self.methods,
                "predicted": self.estimate.predicted, "budget_bytes": self.estimate.budget_bytes, "tried": self.tried}  # fmt: skip


def save_plan(choice: Choice, path: str | Path, model: str, input_shape: tuple[int, int, int], batch_size: int) -> Path:
    """Write the plan file `fit --plan` reads back (YAML; `version` guards the format)."""
    doc = {**choice.to_dict(), "model": model, "input_shape": list(input_shape), "batch_size": batch_size}
    doc.pop("tried", None)
    path = Path(path)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(doc, default=str)), sort_keys=False))
    return path


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read a plan file; a missing file, bad YAML or another version is one clear error."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan {path}: no such file") from None
    except yaml.YAMLError:
        raise ConfigError(f"plan {path}: not valid YAML; write it again with `edgetrain fit` or by hand") from None
    if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION or not isinstance(doc.get("methods"), list):
        raise ConfigError(f"plan {path}: expected version: {PLAN_VERSION} and a methods list")
    for spec in doc["methods"]:
        parse_spec(str(spec))  # unknown methods and bad options fail here, before training
    return doc


def ladder(profile: DeviceProfile, batch_size: int) -> list[list[str]]:
    base = [[], ["checkpoint"]]
    if profile.bf16_supported:
        base += [["precision:dtype=bf16"], ["checkpoint", "precision:dtype=bf16"]]
    rungs = list(base)
    k = 2
    while k <= batch_size:
        rungs.append([*base[-1], f"microbatch:micro_batches={k}"])
        k *= 2
    return rungs


def choose(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int, profile: DeviceProfile,
           optimizer: str = "sgd", name: str = "model", budget_bytes: int | None = None) -> Choice:  # fmt: skip
    """The cheapest rung whose predicted device peak fits `budget_bytes` (default: the profile's)."""
    budget = budget_bytes or profile.usable_memory_bytes
    tried: list[dict[str, Any]] = []
    best: Estimate | None = None
    for methods in ladder(profile, batch_size):
        est = estimate(model, input_shape, batch_size, optimizer, profile, methods, name=name)
        peak = est.predicted["peak_device_bytes"]
        tried.append({"methods": methods, "peak_device_bytes": peak, "fits": peak <= budget})
        if best is None or peak < best.predicted["peak_device_bytes"]:
            best = est
        if peak <= budget:
            return Choice(methods, est, tried)
    mib = 2**20
    assert best is not None
    raise BudgetError(
        f"nothing fits {profile.name}: the smallest peak reachable is {best.predicted['peak_device_bytes'] / mib:.0f} MiB "
        f"({'+'.join(best.methods) or 'plain'}) against a budget of {budget / mib:.0f} MiB: "
        f"use a smaller --input-size or model, or fewer trainable layers"
    )
