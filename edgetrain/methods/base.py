"""The method registry: config type -> handler, and `apply_method_` (in place, torchao-style).

A method is a frozen, validated config dataclass plus a handler that says which modules it
applies to and how (`apply`), or how it changes the step (`step_settings`: precision,
micro-batching). Every method must run under fake tensors, so the predictor measures it
by running it; a handler whose memory cannot be seen that way overrides `unseen_bytes`.

The planner reads methods only through the handler protocol below (`plan_scope`, `unit_kind`,
`candidates`, `step_candidates`, `at_batch`, `seconds`, `step_effect`, risk on the config): a new method is
one file that registers its handler, and the planner weighs it without knowing its name.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from edgetrain._registry import Registry
from edgetrain.core.step import StepSettings
from edgetrain.errors import ConfigError

if TYPE_CHECKING:
    from edgetrain.devices.profile import DeviceProfile

# What the planner chooses per, outermost first. A run of blocks (a stage of shape-preserving
# blocks) holds the blocks and layers inside it: either one run option, or options inside. The
# optimizer is planned step-wide (`StepEffect.gradient_scale`, `state_scale`).
UNIT_KINDS = ("run", "block", "layer")


# The most a change of the layers risks (Tucker-2 below a fifth of the FLOPs). A config that keeps the
# layers but risks more (micro-batches of one image under BatchNorm: -21 points on digits, bench/levers.txt)
# changes the training more than a change of the layers: it is at that level.
LAYER_CHANGE_RISK = 7


def change_level(config: MethodConfig, risk: int | None = None) -> str:
    """Its `CHANGE_LEVELS` entry: 'architecture' for a config that changes the layers or risks more
    than such a change (`LAYER_CHANGE_RISK`), else 'lossy' when it risks accuracy (`risk`: a
    step-wide config's effective risk on this model), else 'exact'."""
    risk = config.risk if risk is None else risk
    if config.structural or config.changes_layers or risk > LAYER_CHANGE_RISK:
        return "architecture"
    return "lossy" if risk > 0 else "exact"


@dataclass(frozen=True)
class UnitCost:
    """What a unit's option is priced from: the unit's forward FLOPs and plain saved bytes, and the
    device's throughput (GFLOP/s, GB/s)."""

    flops: int
    saved_plain: int
    gflops: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class StepEffect:
    """A step-wide config as the planner models it: saved activations of dtype-keeping options
    scale by `activation_scale`, every activation is held for 1/`batch_divisor` of the batch at a
    time, `gradient_scale` and `state_scale` of the gradient and optimizer-state bytes are held at
    the peak, `param_copies` of the parameter bytes are held again as copies (autocast's
    half-precision weights, saved for backward), the step takes `time_factor` times as long, and it
    risks `risk` ranks of accuracy. `step_temps`: the optimizer step's own temporaries, in largest
    parameters per optimizer-state slot, where the config changes how the step runs (None: torch's
    step, which the planner measures in plain's)."""

    activation_scale: float = 1.0
    batch_divisor: int = 1
    gradient_scale: float = 1.0
    state_scale: float = 1.0
    param_copies: float = 0.0
    time_factor: float = 1.0
    risk: int = 0
    reason: str = ""
    step_temps: float | None = None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. `risk`: accuracy-risk rank the planner weighs (0 = exact)."""

    name: ClassVar[str] = "?"
    risk: ClassVar[int] = 0
    help: ClassVar[str] = ""
    structural: ClassVar[bool] = False  # changes the layers themselves (low-rank): applied before the rest
    changes_layers: ClassVar[bool] = False  # other layers, not applied first (reversible): --allow architecture
    spec_keys: ClassVar[tuple[str, ...]] = ()  # options `spec_of` always writes, default or not

    def for_shapes(self) -> MethodConfig:
        """The config to apply where only shapes and bytes matter (estimating, planning, measuring
        a fresh model): the same by default; a method whose values are costly to compute and do not
        change any shape returns a cheaper twin."""
        return self

    def from_scratch(self) -> MethodConfig:
        """The config to apply to a model trained from scratch (no weights worth converting): the
        same by default; a conversion of trained weights returns fresh, trainable ones."""
        return self


class MethodHandler:
    """How a method acts. Defaults: no module replaced, step unchanged."""

    config_type: type[MethodConfig] = MethodConfig
    # How the planner may choose it: "unit" (per block or layer), "step" (step-wide), or "none"
    # (only when asked for: changes to the layers themselves, freezing).
    plan_scope: ClassVar[str] = "none"
    # Whether the step still computes the same when DDP replicates it (`fit --nproc`): a method that
    # updates or recomputes gradients outside autograd's accumulation, which DDP hooks, says False.
    replicas_ok: ClassVar[bool] = True

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        """Whether `apply` handles this module (by default: none; model-wide methods)."""
        return False

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        """Return the module that replaces `module` (may be `module` changed in place)."""
        return module

    def apply_model(self, model: nn.Module, config: MethodConfig) -> None:
        """Model-wide changes (e.g. freezing a prefix); runs before per-module `apply`."""

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        return settings

    # --- the planner's protocol ---------------------------------------------------------------
    def unit_kind(self, name: str, module: nn.Module) -> str | None:
        """The kind of planning unit (one of `UNIT_KINDS`) `module` is for this method, or None."""
        return None

    def candidates(self, kind: str) -> list[MethodConfig]:
        """The configs the planner may choose for a unit of `kind` (per-unit methods)."""
        return []

    def derived_from(self, config: MethodConfig) -> tuple[MethodConfig, ...]:
        """Candidates whose measured saved bytes give `config`'s (`derive`): no fake run of its own."""
        return ()

    def derive(self, config: MethodConfig, saved: Mapping[MethodConfig, int]) -> int:
        raise NotImplementedError

    def keeps_dtype(self, config: MethodConfig) -> bool:
        """Whether what it saves is in the step's autocast dtype (so halves with half precision)."""
        return True

    def seconds(self, config: MethodConfig, unit: UnitCost) -> float:
        """Extra step time of `config` on one unit."""
        return 0.0

    def backward_transient(self, config: MethodConfig, saved_plain: int) -> int:
        """Bytes a unit holds again while its backward runs, beyond what it saved (recompute
        regenerates activations), at most: from the unit's plain saved bytes."""
        return 0

    def step_candidates(self, profile: DeviceProfile, batch_size: int) -> list[MethodConfig]:
        """The step-wide configs the planner may choose on this device and batch."""
        return []

    def at_batch(self, config: MethodConfig, batch_size: int) -> MethodConfig:
        """`config` as used at this batch size: the same by default; a config whose risk depends on
        the batch (micro-batches: the images BatchNorm sees) learns it here."""
        return config

    def step_effect(
        self, config: MethodConfig, profile: DeviceProfile, has_batchnorm: bool, batch_size: int
    ) -> StepEffect:
        return StepEffect(risk=int(config.risk))

    def export_(self, model: nn.Module) -> list[str]:
        """Switch this method's custom autograd off in `model` so that it can be traced (the function
        computed stays the same); return what was switched off. Class swaps are undone for every
        method by `set_exportable` itself."""
        return []

    def unseen_bytes(self, model: nn.Module, config: MethodConfig) -> int:
        """Bytes a step holds for this method that fake tensors cannot see (added to the estimate)."""
        return 0

    @property
    def per_module(self) -> bool:
        """Whether the method acts on eligible modules (and so can find none to act on)."""
        return type(self).eligible is not MethodHandler.eligible


class UnusedMethod(ConfigError):
    """A method asked for by name found no eligible layer: it would change nothing."""

    def __init__(self, spec: str, model: str = "this model"):
        self.spec, self.model = spec, model
        what = parse_spec(spec).help
        super().__init__(f"--method {spec} changes nothing in {model}: no layer is eligible ({what}); drop it, "
                         "or add --skip-unused to go on without it")  # fmt: skip

    def skipped_line(self) -> str:
        return f"--method {self.spec} skipped: no eligible layer in {self.model}"


METHODS: Registry[MethodHandler] = Registry("method")
_BY_TYPE: dict[type[MethodConfig], MethodHandler] = {}


def register_method(handler: MethodHandler) -> MethodHandler:
    """Register a handler under its config type's `name`."""
    METHODS.register(handler.config_type.name, handler)
    _BY_TYPE[handler.config_type] = handler
    return handler


def handler_for(config: MethodConfig) -> MethodHandler:
    _load_builtin()
    try:
        return _BY_TYPE[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered method config") from None


def list_methods(pattern: str = "*") -> list[str]:
    _load_builtin()
    return METHODS.list(pattern)


ALIASES: dict[str, str] = {}  # an old method name -> the spec that replaced it


def register_alias(old: str, spec: str) -> None:
    """Keep an old method name working: `old:opts` parses as `spec` with `opts` added."""
    ALIASES[old] = spec


def parse_spec(spec: str) -> MethodConfig:
    """'compress:bits=2,group=64' -> the registered config, with values typed and validated."""
    _load_builtin()
    name, _, rest = spec.partition(":")
    if name.strip() in ALIASES:  # e.g. cp-refused:iters=2 -> cp:refuse=true,iters=2
        name, _, first = ALIASES[name.strip()].partition(":")
        rest = ",".join(filter(None, (first, rest)))
    cls = METHODS.get(name.strip()).config_type
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ConfigError(
                f"method spec '{spec}': bad option '{item}'; {name} takes {', '.join(fields) or 'no options'}"
            )
        kwargs[key] = _coerce(value, fields[key].type, spec, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method spec '{spec}': {e}") from None


def spec_of(config: MethodConfig) -> str:
    """The spec that parses back to `config`: its name and the options that differ from the
    defaults, plus those its class always names ('compress:bits=4')."""
    opts = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.metadata.get("spec", True) and (f.name in config.spec_keys or v != f.default):
            opts.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}")
    return config.name + (":" + ",".join(opts) if opts else "")


def planned_handlers(scope: str) -> list[MethodHandler]:
    """The registered handlers the planner chooses with, in registration order ("unit" or "step")."""
    _load_builtin()
    return [METHODS.get(n) for n in METHODS if METHODS.get(n).plan_scope == scope]


def as_config(method: MethodConfig | str) -> MethodConfig:
    """A spec parsed (once, where it enters), or a config as it is."""
    return method if isinstance(method, MethodConfig) else parse_spec(str(method))


def structural_specs(specs: list[str]) -> list[str]:
    """The specs among `specs` whose methods change the layers themselves (low-rank): applied
    before everything else, and planned on top of rather than chosen by the planner."""
    return [s for s in specs if parse_spec(s).structural]


def describe_methods() -> list[dict[str, Any]]:
    """Name, help, risk (at the default options: some methods' risk depends on them), `--allow`
    level and options (with defaults) of every registered method."""
    out = []
    for name in list_methods():
        cls = METHODS.get(name).config_type
        opts = {f.name: f.default for f in dataclasses.fields(cls)}
        out.append({"name": name, "help": cls.help, "risk": int(cls().risk), "level": change_level(cls()),
                    "options": opts})  # fmt: skip
    return out


def unused_methods(model: nn.Module, specs: list[str]) -> list[str]:
    """The specs that would change nothing in `model` (applied in order to a copy, shapes only)."""
    if not specs:
        return []
    _, kept, _ = prepare(model, specs, shapes_only=True, unused="drop")
    return [s for s in specs if parse_spec(s).for_shapes() not in kept]


def apply_method_(model: nn.Module, config: MethodConfig, layers: str = "*") -> list[str]:
    """Apply `config` in place to every eligible module whose name matches `layers`.

    Returns the names of the modules changed. Outermost eligible modules win: once a module
    is replaced, its children are not visited.
    """
    handler = handler_for(config)
    handler.apply_model(model, config)
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        if fnmatch.fnmatch(name, layers) and handler.eligible(name, module, config):
            new = handler.apply(module, config)
            if new is not module:
                _set_submodule(model, name, new)
            done.append(name)
    return done


def prepare(
    model: nn.Module,
    methods: list[MethodConfig | str],
    inplace: bool = False,
    shapes_only: bool = False,
    unused: str = "keep",
    name: str = "this model",
) -> tuple[nn.Module, list[MethodConfig], StepSettings]:
    """Apply `methods` (configs or specs) to a copy of `model`, or to `model` itself when
    `inplace`; returns the model, the configs applied and the step settings they imply.
    `shapes_only`: the weights' values will not be used (see `MethodConfig.for_shapes`).
    `unused`: a per-module method that finds no eligible layer is kept (in the configs),
    refused ("error": `UnusedMethod`) or dropped ("drop")."""
    configs = [as_config(m) for m in methods]
    configs = [c.for_shapes() for c in configs] if shapes_only else configs
    if configs and not inplace:
        model = copy.deepcopy(model)
    kept = []
    for given, c in zip(methods, configs, strict=True):
        if not apply_method_(model, c) and handler_for(c).per_module and unused != "keep":
            if unused == "error":
                raise UnusedMethod(given if isinstance(given, str) else c.name, name)
            continue
        kept.append(c)
    return model, kept, step_settings_for(kept)


def step_settings_for(configs: list[MethodConfig], settings: StepSettings | None = None) -> StepSettings:
    settings = settings or StepSettings()
    for c in configs:
        settings = handler_for(c).step_settings(settings, c)
    return settings


_SWAPPED: dict[tuple[type, type], type] = {}


def swap_class_(module: nn.Module, mixin: type) -> nn.Module:
    """Put `mixin` in front of `module`'s class (in place): behaviour changes, parameter names
    and state dicts do not. Swapping twice with the same mixin is a no-op."""
    cls = type(module)
    if issubclass(cls, mixin):
        return module
    if (mixin, cls) not in _SWAPPED:
        _SWAPPED[(mixin, cls)] = type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _SWAPPED[(mixin, cls)]
    return module


def set_exportable(model: nn.Module) -> list[str]:
    """Switch custom-autograd methods off so that the model can be traced (timm's `set_exportable`):
    class swaps are undone, then every registered handler's `export_` switches off the rest. The
    function computed is the same; only what backward keeps changes. Returns the methods switched off."""
    _load_builtin()
    off: set[str] = set()
    plain = {swapped: (mixin, base) for (mixin, base), swapped in _SWAPPED.items()}
    for m in model.modules():
        if type(m) in plain:
            mixin, base = plain[type(m)]
            m.__class__ = base
            off.add(getattr(mixin, "method", mixin.__name__))
    for name in METHODS:
        off.update(METHODS.get(name).export_(model))
    return sorted(off)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _coerce(value: str, typ: Any, spec: str, key: str) -> Any:
    typ = str(typ)
    try:
        if "bool" in typ:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if "int" in typ and "float" not in typ:
            return int(value)
        if "float" in typ:
            return float(value)
    except ValueError:
        raise ConfigError(f"method spec '{spec}': option {key}={value!r} must be {typ}") from None
    return value


def _load_builtin() -> None:
    """Import the built-in method modules so that they register (once)."""
    from edgetrain.methods import (  # noqa: F401
        checkpoint,
        compress,
        freeze,
        lowrank,
        optim_state,
        orthogonality,
        partial,
        precision,
        reversible,
        step_in_backward,
    )
