"""What the planner chooses among: units (runs of blocks, blocks, leftover layers), their options, and what each
option costs in saved bytes (measured with fake tensors) and in step time (priced from the profile).

An option may change a unit's parameters too (a layer made low-rank): each unit's parameter,
gradient and optimizer-state bytes (`Fixed`) are counted under each option, so the planner weighs
what an option does to the weights as well as to the activations.

Units and options come from the registered handlers whose `plan_scope` is "unit" (the protocol in
methods/base.py): a handler says which modules are units of which kind and which configs it
offers there. Each option is applied to every unit that has it, in one fake forward pass (plain:
a whole fake training step); the tracker's records created during a unit's forward and still
held when forward ends are that unit's saved bytes under that option. `None` is the plain option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from edgetrain.core.step import OPTIMIZERS, StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.memory.measure import flop_hooks, shell_copy, tracked_step
from edgetrain.memory.predict import quiet_fake_tensor_log
from edgetrain.memory.tracker import MemoryTracker
from edgetrain.methods.base import (
    UNIT_KINDS,
    MethodConfig,
    MethodHandler,
    UnitCost,
    handler_for,
    planned_handlers,
)  # fmt: skip
from edgetrain.planning.record import Choices, apply_plan_

Option = MethodConfig | None  # None: plain


@dataclass(frozen=True)
class Fixed:
    """The bytes a step holds besides activations: parameters and buffers, the trainable
    parameters' gradients, and optimizer state (momentum; Adam's two moments)."""

    params: int = 0
    gradients: int = 0
    state: int = 0
    largest: int = 0  # the largest trainable parameter's bytes (its gradient and step's temporaries)

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.state


@dataclass
class Unit:
    name: str
    kind: str  # one of UNIT_KINDS
    options: tuple[Option, ...] = (None,)  # plain first, then each unit handler's candidates
    flops: int = 0  # forward FLOPs
    saved: dict[Option, int] = field(default_factory=dict)  # option -> saved bytes
    fixed: dict[Option, Fixed] = field(default_factory=dict)  # option -> the unit's own fixed bytes
    parent: str | None = None  # the run of blocks this unit is inside, if any


@dataclass
class UnitTable:
    """Per-unit saved and fixed bytes by option, the model's fixed bytes, and each all-one-option
    run's activation peak (plain: its whole step, without warm-up; any other option: its forward
    pass, where an option's own transients are)."""

    units: list[Unit]
    acts: dict[Option, int]  # option applied everywhere -> tensor peak (see above) less its fixed bytes
    fixed: Fixed  # the whole model's, plain
    flops: int  # forward FLOPs of the whole model
    outside_largest: int = 0  # the largest trainable parameter outside every unit (no option changes it)
    module_flops: dict[str, int] = field(default_factory=dict)  # module -> forward FLOPs (plain's)


def find_units(model: nn.Module, handlers: list[MethodHandler] | None = None) -> list[Unit]:
    """The modules a unit handler calls a unit, kind by kind (`UNIT_KINDS`): the outermost of each
    kind; runs of blocks hold the blocks and layers inside them as their `parent`; nothing inside a
    block is a unit. Each unit has the options the handlers offer for its kind."""
    handlers = planned_handlers("unit") if handlers is None else handlers
    units: list[Unit] = []
    for kind in UNIT_KINDS:
        closed = [u.name for u in units if u.kind != "run"]
        for name, m in model.named_modules():
            if not name or any(_within(name, t) for t in closed + [u.name for u in units if u.kind == kind]):
                continue
            if any(h.unit_kind(name, m) == kind for h in handlers):
                opts = tuple(c for h in handlers for c in h.candidates(kind))
                parent = next((u.name for u in units if u.kind == "run" and _within(name, u.name)), None)
                units.append(Unit(name, kind, (None, *opts), parent=parent))
    return units


def _within(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _range_hooks(model: nn.Module, units: list[Unit], ranges: dict[str, list[int]]) -> list:
    """Record, for each unit, the tracker record ids made during its (first, forward) call."""

    def pre(mod, args, name):
        tr = _get_current_dispatch_mode()
        if isinstance(tr, MemoryTracker) and tr.phase == "forward" and name not in ranges:
            ranges[name] = [len(tr._records), -1]

    def post(mod, args, out, name):
        tr = _get_current_dispatch_mode()
        if isinstance(tr, MemoryTracker) and name in ranges and ranges[name][1] < 0:
            ranges[name][1] = len(tr._records)

    mods = dict(model.named_modules())
    hs = []
    for u in (u for u in units if u.name in mods):  # a unit inside a replaced run is gone
        hs.append(mods[u.name].register_forward_pre_hook(lambda m, a, n=u.name: pre(m, a, n)))
        hs.append(mods[u.name].register_forward_hook(lambda m, a, o, n=u.name: post(m, a, o, n)))
    return hs


def unit_table(
    model: nn.Module,
    spec: StepSpec,
    units: list[Unit] | None = None,
    keep: Callable[[Option], bool] | None = None,
    known: UnitTable | None = None,
) -> UnitTable:
    """Run one fake forward pass per measured option (applied to every unit that has it; plain: a
    whole step, whose peak the planner starts from), split saved bytes
    by unit, and derive the options a handler computes from others (`derived_from`). `keep`: the
    options to weigh (the others are not measured). `known`: a table of the same model and step
    (another change level's) whose options are taken as measured. (A fake step costs by its ops,
    not its batch: measuring at a smaller batch saves nothing.)"""
    units = units if units is not None else find_units(model)
    if keep is not None:
        for u in units:
            u.options = tuple(o for o in u.options if o is None or keep(o))
    every = list(dict.fromkeys(o for u in units for o in u.options))
    derived = {o: handler_for(o).derived_from(o) for o in every if o is not None and handler_for(o).derived_from(o)}
    have = known.acts if known is not None else {}
    table = _measure(model, spec, units, [o for o in every if o not in derived and o not in have])
    if known is not None:
        _take_known(table, known, every)
    for o, sources in derived.items():  # a floor: the least of its sources' all-option peaks (what
        peaks = [table["acts"][s] for s in sources if s in table["acts"]]  # they share: the codec's transient)
        if peaks:
            table["acts"][o] = min(peaks)
    for u in units:
        for o in (o for o in u.options if o not in derived):
            u.saved[o], u.fixed[o] = table["saved"][(u.name, o)], table["fixed"][(u.name, o)]
        for o, sources in derived.items():
            if o in u.options:
                u.saved[o] = handler_for(o).derive(o, {s: u.saved[s] for s in sources})
                u.fixed[o] = u.fixed[sources[0]]  # derived options keep their source's weights
        u.flops = sum(v for k, v in table["flops"].items() if k == u.name or k.startswith(u.name + "."))
    fixed = fixed_of(model, spec.optimizer)
    tops = [u.name for u in units if u.parent is None]
    outside = max((p.numel() * p.element_size() for n, p in model.named_parameters()
                   if p.requires_grad and not any(_within(n, t) for t in tops)), default=0)  # fmt: skip
    return UnitTable(units, table["acts"], fixed, sum(table["flops"].values()), outside, table["flops"])


def _take_known(table: dict[str, dict], known: UnitTable, options: list[Option]) -> None:
    """Copy into `table` what `known` measured of `options`: peaks, each unit's saved and fixed bytes,
    and the FLOPs (measured with plain, which every table has)."""
    for o in (o for o in options if o in known.acts):
        table["acts"][o] = known.acts[o]
        for u in (u for u in known.units if o in u.saved):
            table["saved"][(u.name, o)], table["fixed"][(u.name, o)] = u.saved[o], u.fixed[o]
    table["flops"].update(known.module_flops)


def _measure(model: nn.Module, spec: StepSpec, units: list[Unit], options: list[Option]) -> dict[str, dict]:
    """One fake forward per option (plain: step): {"acts": option -> peak less fixed bytes, "saved": (unit, option)
    -> saved bytes, "flops": module -> forward FLOPs, "fixed": (unit, option) -> `Fixed`}."""
    out: dict[str, dict] = {"acts": {}, "saved": {}, "flops": {}, "fixed": {}}
    for option in options:
        out["acts"][option] = _measure_option(model, spec, units, option, out, out["flops"] if option is None else None)
    return out


def _measure_option(model: nn.Module, spec: StepSpec, units: list[Unit], option: Option, out: dict, flops) -> int:
    """One fake forward (plain: step) with `option` on every unit that has it: records each unit's
    saved and fixed bytes in `out`; returns its tensor peak less the changed model's fixed bytes."""
    m = shell_copy(model)  # the plan changes layers and runs a fake step: no weight is copied
    apply_plan_(
        m, Choices(layers={u.name: option for u in units if option is not None and option in u.options}).for_shapes()
    )
    ranges: dict[str, list[int]] = {}
    hooks = _range_hooks(m, units, ranges) + (flop_hooks(m, flops) if flops is not None else [])
    one = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, micro_batches=1))
    try:
        with quiet_fake_tensor_log():
            rep = tracked_step(m, one, fake=True, warmup=False, forward_only=option is not None)
    finally:
        for h in hooks:
            h.remove()
    mods = dict(m.named_modules())
    for u in (u for u in units if option in u.options):
        a, b = ranges.get(u.name, [0, 0])
        out["saved"][(u.name, option)] = sum(rep.sizes[r] for r in range(a, b) if rep.categories[r] == "activations")
        out["fixed"][(u.name, option)] = fixed_of(mods[u.name], spec.optimizer)
    return rep.peak_bytes - fixed_of(m, spec.optimizer).total


def fixed_of(module: nn.Module, optimizer: str) -> Fixed:
    """Parameters and buffers of `module`, plus gradients and optimizer state of its trainable ones."""
    every = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad]
    return Fixed(every, sum(sizes), sum(sizes) * OPTIMIZERS.get(optimizer, 1), max(sizes, default=0))


def throughput(profile: DeviceProfile | None) -> tuple[float, float]:
    """(GFLOP/s, GB/s) the time model uses: the profile's, or defaults where it has none."""
    gflops = (profile.fp32_gflops if profile else None) or 100.0
    return gflops, (profile.memory_bandwidth_gbs if profile else None) or 10.0


def option_seconds(unit: Unit, option: Option, profile: DeviceProfile | None) -> float:
    """Extra step time of `option` on `unit`, as its handler prices it (plain: none)."""
    if option is None:
        return 0.0
    gflops, bandwidth = throughput(profile)
    return handler_for(option).seconds(option, UnitCost(unit.flops, unit.saved[None], gflops, bandwidth))


def step_seconds(table: UnitTable, profile: DeviceProfile | None) -> float:
    """Plain step time: forward + backward FLOPs over throughput, plus activation traffic."""
    gflops, bandwidth = throughput(profile)
    saved = sum(u.saved[None] for u in table.units if u.parent is None)
    return 3 * table.flops / (gflops * 1e9) + 4 * saved / (bandwidth * 1e9)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
