"""`Plan`: what to apply to a model, per layer and step-wide, and `apply_plan_` to apply it in place.

A plan is a name -> method spec map (per layer, torchao's per-module config) plus step-wide
methods (precision, micro-batching), with the prediction and the reasons that chose it. It
round-trips through YAML or JSON with a version field; `apply_plan_` refuses a plan made for
another model (a layer it names is missing, or has other parameter shapes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from edgetrain.core.step import StepSettings
from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.memory.predict import Prediction
from edgetrain.methods.base import apply_method_, handler_for, parse_spec, step_settings_for

PLAN_VERSION = 2


@dataclass
class Plan:
    """Step-wide `methods` and per-layer `layers` (name -> spec); `shapes` fingerprints the layers."""

    methods: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)
    model: str = "model"
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    batch_size: int = 32
    optimizer: str = "sgd"
    device: str | None = None
    budget_bytes: int | None = None
    predicted: Prediction | None = None
    overhead: float = 1.0
    risk: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def is_plain(self) -> bool:
        return not self.methods and not self.layers

    def summary(self) -> str:
        """'plain', or the methods with per-layer choices counted: 'bf16 + checkpoint x4 + compress:bits=4 x9'."""
        if self.is_plain:
            return "plain"
        counts: dict[str, int] = {}
        for spec in self.layers.values():
            counts[spec] = counts.get(spec, 0) + 1
        return " + ".join([*self.methods, *(f"{s} x{n}" for s, n in counts.items())])

    def specs(self) -> list[str]:
        """Every method spec the plan uses, once: step-wide ones, then per-layer ones."""
        return list(dict.fromkeys([*self.methods, *self.layers.values()]))

    def step_settings(self) -> StepSettings:
        return step_settings_for([parse_spec(m) for m in self.methods])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, doc: Any, where: str = "plan") -> Plan:
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping with version: {PLAN_VERSION}")
        if doc.get("version") != PLAN_VERSION:
            raise ConfigError(
                f"{where}: plan version {doc.get('version')!r}, this edgetrain reads version {PLAN_VERSION}: "
                "make it again with `edgetrain plan`"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            plan = cls(**{**doc, "predicted": Prediction.from_dict(doc["predicted"]) if doc.get("predicted") else None})
            for spec in [*plan.methods, *plan.layers.values()]:
                parse_spec(str(spec))  # unknown methods and bad options fail here, before training
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed ({e}); make it again with `edgetrain plan`") from None
        except EdgetrainError as e:
            raise ConfigError(f"{where}: {e}") from None
        return plan

    def save(self, path: str | Path) -> Path:
        """YAML, or JSON when the name ends in .json."""
        path = Path(path)
        doc = self.to_dict()
        path.write_text(json.dumps(doc, indent=1) if path.suffix == ".json" else yaml.safe_dump(doc, sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())  # JSON is YAML
        except FileNotFoundError:
            raise ConfigError(f"plan {path}: no such file; write one with `edgetrain plan --out {path}`") from None
        except OSError as e:
            raise ConfigError(f"plan {path}: cannot be read ({e.strerror}): give a plan file") from None
        except (yaml.YAMLError, UnicodeDecodeError):  # a binary file is no text at all
            raise ConfigError(f"plan {path}: not valid YAML or JSON; write it again with `edgetrain plan`") from None
        return cls.from_dict(doc, f"plan {path}")


def param_shapes(module: nn.Module) -> list[list[int]]:
    return [list(p.shape) for p in module.parameters()]


def apply_plan_(model: nn.Module, plan: Plan) -> StepSettings:
    """Apply `plan` to `model` in place: structural (low-rank) methods, then per-layer specs (named
    as in the factorized model), then the other step-wide ones; returns the step settings
    (precision, micro-batches, regularizer) the training step must use."""
    configs = [parse_spec(m) for m in plan.methods]
    for c in configs:
        if c.structural:
            apply_method_(model, c)
    modules = dict(model.named_modules())
    _check_layers(plan, modules)
    for name, spec in plan.layers.items():
        config = parse_spec(spec)
        pattern = name if handler_for(config).eligible(name, modules[name], config) else f"{name}.*"
        apply_method_(model, config, layers=pattern)
    for c in configs:
        if not c.structural:
            apply_method_(model, c)
    return step_settings_for(configs)


def _check_layers(plan: Plan, modules: dict[str, nn.Module]) -> None:
    """Refuse a plan made for another model: a layer it names is missing or has other shapes."""
    for name in plan.layers:
        if name not in modules:
            near = [n for n in modules if n and n.split(".")[-1] == name.split(".")[-1]][:3]
            raise ConfigError(
                f"plan for {plan.model} names layer '{name}', which this model does not have"
                + (f" (similar: {', '.join(near)})" if near else "")
                + ": make the plan for this model with `edgetrain plan`"
            )
        want = plan.shapes.get(name)
        if want is not None and want != param_shapes(modules[name]):
            raise ConfigError(
                f"plan for {plan.model}: layer '{name}' has parameter shapes {param_shapes(modules[name])} "
                f"here, {want} in the plan: make the plan for this model with `edgetrain plan`"
            )
