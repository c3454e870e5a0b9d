"""What the planner chooses among: units (blocks or leftover layers), their options, and what each
option costs in saved bytes (measured with fake tensors) and in step time (priced from the profile).

Units and options come from the registered handlers whose `plan_scope` is "unit" (the protocol in
methods/base.py): a handler says which modules are units of which kind and which configs it
offers there. Each option is applied to every unit that has it, in one fake training step; the
tracker's records created during a unit's forward and still held when forward ends are that
unit's saved bytes under that option. `None` is the plain option.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from edgetrain.core.step import StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.memory.measure import flop_hooks, tracked_step
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


@dataclass
class Unit:
    name: str
    kind: str  # one of UNIT_KINDS
    options: tuple[Option, ...] = (None,)  # plain first, then each unit handler's candidates
    flops: int = 0  # forward FLOPs
    saved: dict[Option, int] = field(default_factory=dict)  # option -> saved bytes


@dataclass
class UnitTable:
    """Per-unit saved bytes by option, the step's fixed bytes and each all-one-option run's peak
    (steps without warm-up: optimizer state is not there yet; only differences are used)."""

    units: list[Unit]
    peaks: dict[Option, int]  # option applied everywhere -> tensor peak of the step
    fixed_bytes: int  # parameters + gradients + optimizer state
    flops: int  # forward FLOPs of the whole model


def find_units(model: nn.Module, handlers: list[MethodHandler] | None = None) -> list[Unit]:
    """Outermost modules that a unit handler calls a unit, kind by kind (blocks, then the layers
    outside every block), each with the options the handlers offer for its kind."""
    handlers = planned_handlers("unit") if handlers is None else handlers
    units: list[Unit] = []
    for kind in UNIT_KINDS:
        taken = [u.name for u in units]
        for name, m in model.named_modules():
            if not name or any(name == t or name.startswith(t + ".") for t in taken):
                continue
            if any(h.unit_kind(name, m) == kind for h in handlers):
                opts = tuple(c for h in handlers for c in h.candidates(kind))
                units.append(Unit(name, kind, (None, *opts)))
                if kind == UNIT_KINDS[0]:
                    taken.append(name)  # blocks are outermost; layers are leaves
    return units


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
    for u in units:
        hs.append(mods[u.name].register_forward_pre_hook(lambda m, a, n=u.name: pre(m, a, n)))
        hs.append(mods[u.name].register_forward_hook(lambda m, a, o, n=u.name: post(m, a, o, n)))
    return hs


def unit_table(model: nn.Module, spec: StepSpec, units: list[Unit] | None = None) -> UnitTable:
    """Run one fake step per measured option (applied to every unit that has it), split saved bytes
    by unit, and derive the options a handler computes from others (`derived_from`)."""
    units = units if units is not None else find_units(model)
    every = list(dict.fromkeys(o for u in units for o in u.options))
    derived = {o: handler_for(o).derived_from(o) for o in every if o is not None and handler_for(o).derived_from(o)}
    peaks: dict[Option, int] = {}
    flops: dict[str, int] = {}
    for option in [o for o in every if o not in derived]:
        peaks[option] = _measure_option(model, spec, units, option, flops if option is None else None)
    for u in units:
        for o, sources in derived.items():
            if o in u.options:
                u.saved[o] = handler_for(o).derive(o, {s: u.saved[s] for s in sources})
        u.flops = sum(v for k, v in flops.items() if k == u.name or k.startswith(u.name + "."))
    return UnitTable(units, peaks, fixed_bytes(model, spec.optimizer), sum(flops.values()))


def _measure_option(model: nn.Module, spec: StepSpec, units: list[Unit], option: Option, flops: dict | None) -> int:
    """One fake step with `option` on every unit that has it: fills `unit.saved[option]`, returns the peak."""
    m = copy.deepcopy(model)
    apply_plan_(m, Choices(layers={u.name: option for u in units if option is not None and option in u.options}))
    ranges: dict[str, list[int]] = {}
    hooks = _range_hooks(m, units, ranges) + (flop_hooks(m, flops) if flops is not None else [])
    one = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, micro_batches=1))
    try:
        with quiet_fake_tensor_log():
            rep = tracked_step(m, one, fake=True, warmup=False)
    finally:
        for h in hooks:
            h.remove()
    for u in units:
        a, b = ranges.get(u.name, [0, 0])
        u.saved[option] = sum(rep.sizes[r] for r in range(a, b) if rep.categories[r] == "activations")
    return rep.peak_bytes


def fixed_bytes(model: nn.Module, optimizer: str) -> int:
    """Parameters and buffers, plus gradients and optimizer state of the trainable ones."""
    every = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return every + trainable * (1 + (2 if optimizer == "adamw" else 1))


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
    saved = sum(u.saved[None] for u in table.units)
    return 3 * table.flops / (gflops * 1e9) + 4 * saved / (bandwidth * 1e9)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
