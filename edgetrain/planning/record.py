"""`Plan`: what was asked (`PlanRequest`), what to apply (`Choices`: step-wide and per-layer
method configs, torchao's per-module config map) and why (prediction, reasons, candidates);
`apply_plan_` applies the choices in place.

Specs are parsed once, when choices are made or read; a plan holds configs. It round-trips
through YAML or JSON with a version field (specs written back as strings); a version 2 file
is converted. `apply_plan_` refuses a plan made for another model (a layer it names is
missing, or has other parameter shapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from edgetrain.core.step import StepSettings
from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.levels import DEFAULT_ALLOW, check_allow
from edgetrain.memory.predict import Prediction
from edgetrain.methods.base import (
    MethodConfig,
    apply_method_,
    as_config,
    change_level,
    handler_for,
    spec_of,
    step_settings_for,
)  # fmt: skip

PLAN_VERSION = 3
_REQUEST = ("model", "input_shape", "batch_size", "optimizer", "device", "budget_bytes", "prefer", "allow", "processes")
_ANSWER = ("predicted", "overhead", "risk", "reasons", "candidates", "frontier")
_DERIVED = ("levers", "host_check")  # what `plan --json` adds: read back, such a file is a plan


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is asked for: the model, one training step, and the device it must fit."""

    model: str = "model"
    input_shape: tuple[int, int, int] = (3, 32, 32)
    batch_size: int = 32
    optimizer: str = "sgd"
    device: str | None = None
    budget_bytes: int | None = None
    prefer: str = "speed"
    allow: str = DEFAULT_ALLOW  # how much the plan may change the training (CHANGE_LEVELS)
    processes: int = 1  # DDP ranks running this step (each with batch_size): only methods DDP can follow

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        check_allow(self.allow)


@dataclass
class Choices:
    """What to apply: step-wide `methods` and per-layer `layers` (name -> config); `shapes`
    fingerprints the layers. Spec strings given here are parsed, once."""

    methods: list[MethodConfig] = field(default_factory=list)
    layers: dict[str, MethodConfig] = field(default_factory=dict)
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = [as_config(m) for m in self.methods]
        self.layers = {n: as_config(c) for n, c in self.layers.items()}

    @property
    def is_plain(self) -> bool:
        return not self.methods and not self.layers

    def for_shapes(self) -> Choices:
        """The same choices with each config's cheap twin, for a model whose weights' values will not
        be used (planning, estimating: no decomposition of weights)."""
        return Choices([c.for_shapes() for c in self.methods], {n: c.for_shapes() for n, c in self.layers.items()},
                       self.shapes)  # fmt: skip

    def summary(self) -> str:
        """'plain', or the methods with per-layer choices counted: 'bf16 + checkpoint x4 + compress:bits=4 x9'."""
        if self.is_plain:
            return "plain"
        counts: dict[str, int] = {}
        for c in self.layers.values():
            counts[spec_of(c)] = counts.get(spec_of(c), 0) + 1
        return " + ".join([*map(spec_of, self.methods), *(f"{s} x{n}" for s, n in counts.items())])

    def specs(self) -> list[str]:
        """Every method spec used, once: step-wide ones, then per-layer ones."""
        return list(dict.fromkeys(spec_of(c) for c in [*self.methods, *self.layers.values()]))

    def configs(self) -> list[MethodConfig]:
        return [*self.methods, *self.layers.values()]

    def levers(self) -> list[dict[str, Any]]:
        """Each method the plan needs, once: what it changes (its `CHANGE_LEVELS` entry), its accuracy
        risk, and where it acts (the whole step, or the layers it was chosen for)."""
        out: dict[str, dict[str, Any]] = {}
        for c in self.methods:
            out[spec_of(c)] = {"method": spec_of(c), "level": change_level(c), "risk": int(c.risk), "where": "step"}
        for name, c in self.layers.items():
            row = out.setdefault(spec_of(c), {"method": spec_of(c), "level": change_level(c), "risk": int(c.risk),
                                              "where": []})  # fmt: skip
            row["where"].append(name)
        return list(out.values())

    def step_settings(self) -> StepSettings:
        return step_settings_for(self.methods)

    def to_dict(self) -> dict[str, Any]:
        return {"methods": [spec_of(c) for c in self.methods],
                "layers": {n: spec_of(c) for n, c in self.layers.items()}, "shapes": self.shapes}  # fmt: skip


@dataclass
class Plan:
    """A planning answer: the `request`, the `choices`, and what the planner predicted and why."""

    request: PlanRequest = field(default_factory=PlanRequest)
    choices: Choices = field(default_factory=Choices)
    predicted: Prediction | None = None
    overhead: float = 1.0
    risk: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    frontier: list[dict[str, Any]] = field(default_factory=list)  # when asked: planning/frontier.py
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:  # each step-wide config learns the batch it runs at (its risk may depend on it)
        c, batch = self.choices, self.request.batch_size  # a new Choices: the one given may be another plan's too
        self.choices = Choices([handler_for(m).at_batch(m, batch) for m in c.methods], c.layers, c.shapes)

    @property
    def is_plain(self) -> bool:
        return self.choices.is_plain

    def summary(self) -> str:
        return self.choices.summary()

    def specs(self) -> list[str]:
        return self.choices.specs()

    def to_dict(self) -> dict[str, Any]:
        req = {k: getattr(self.request, k) for k in _REQUEST}
        doc = {"version": self.version, "request": {**req, "input_shape": list(self.request.input_shape)},
               "choices": self.choices.to_dict(), "predicted": self.predicted.to_dict() if self.predicted else None,
               **{k: getattr(self, k) for k in _ANSWER[1:]}}  # fmt: skip
        return json.loads(json.dumps(doc, default=str))

    @classmethod
    def from_dict(cls, doc: Any, where: str = "plan") -> Plan:
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping with version: {PLAN_VERSION}")
        if doc.get("version") == 2:
            doc = _from_version_2(doc)
        if doc.get("version") != PLAN_VERSION:
            raise ConfigError(
                f"{where}: plan version {doc.get('version')!r}, this edgetrain reads versions 2 and {PLAN_VERSION}: "
                "make it again with `edgetrain plan`"
            )
        unknown = sorted(set(doc) - {"version", "request", "choices", *_ANSWER, *_DERIVED})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            predicted = Prediction.from_dict(doc["predicted"]) if doc.get("predicted") else None
            rest = {k: doc[k] for k in _ANSWER[1:] if k in doc}
            return cls(PlanRequest(**(doc.get("request") or {})), Choices(**(doc.get("choices") or {})),
                       predicted, **rest)  # fmt: skip
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed ({e}); make it again with `edgetrain plan`") from None
        except EdgetrainError as e:  # an unknown method or a bad option, before training
            raise ConfigError(f"{where}: {e}") from None

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


def _from_version_2(doc: dict[str, Any]) -> dict[str, Any]:
    """A version 2 plan (one flat mapping) in version 3's layout."""
    flat = dict(doc)
    out: dict[str, Any] = {"version": PLAN_VERSION}
    out["request"] = {k: flat.pop(k) for k in _REQUEST if k in flat}
    out["choices"] = {k: flat.pop(k) for k in ("methods", "layers", "shapes") if k in flat}
    flat.pop("version")
    return {**out, **flat}


def param_shapes(module: nn.Module) -> list[list[int]]:
    return [list(p.shape) for p in module.parameters()]


def apply_plan_(model: nn.Module, plan: Plan | Choices) -> StepSettings:
    """Apply a plan's choices to `model` in place: structural (low-rank) methods, then per-layer
    configs (named as in the factorized model), then the other step-wide ones; returns the step
    settings (precision, micro-batches, regularizer) the training step must use."""
    choices, name = (plan.choices, plan.request.model) if isinstance(plan, Plan) else (plan, "this plan")
    for c in choices.methods:
        if c.structural:
            apply_method_(model, c)
    modules = dict(model.named_modules())
    _check_layers(choices, modules, name)
    for layer, config in choices.layers.items():
        pattern = layer if handler_for(config).eligible(layer, modules[layer], config) else f"{layer}.*"
        apply_method_(model, config, layers=pattern)
    for c in choices.methods:
        if not c.structural:
            apply_method_(model, c)
    return step_settings_for(choices.methods)


def _check_layers(choices: Choices, modules: dict[str, nn.Module], model: str) -> None:
    """Refuse a plan made for another model: a layer it names is missing or has other shapes."""
    for name in choices.layers:
        if name not in modules:
            near = [n for n in modules if n and n.split(".")[-1] == name.split(".")[-1]][:3]
            raise ConfigError(
                f"plan for {model} names layer '{name}', which this model does not have"
                + (f" (similar: {', '.join(near)})" if near else "")
                + ": make the plan for this model with `edgetrain plan`"
            )
        want = choices.shapes.get(name)
        if want is not None and want != param_shapes(modules[name]):
            raise ConfigError(
                f"plan for {model}: layer '{name}' has parameter shapes {param_shapes(modules[name])} "
                f"here, {want} in the plan: make the plan for this model with `edgetrain plan`"
            )
