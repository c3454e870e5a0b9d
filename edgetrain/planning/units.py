"""What the planner chooses among: units (blocks or leftover layers), their options, and what each
option costs in saved bytes (measured with fake tensors) and in step time (priced from the profile).

A unit is an outermost checkpointable block (a residual block, a flat VGG stage) or a
compressible layer outside every block (a stem conv, the classifier). Each option is applied to
every unit at once in one fake training step; the tracker's records created during a unit's
forward and still held when forward ends are that unit's saved bytes under that option.
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
from edgetrain.memory.predict import _quiet_fake_tensor_log
from edgetrain.memory.tracker import MemoryTracker
from edgetrain.methods.base import handler_for, parse_spec
from edgetrain.methods.compress import LAYER_TYPES
from edgetrain.planning.record import Plan, apply_plan_

COMPRESS = ("compress:bits=8", "compress:bits=4", "compress:bits=2")
OPTIONS = ("plain", "checkpoint", *COMPRESS)
RUN_OPTIONS = ("plain", "checkpoint", "compress:bits=4", "compress:bits=2")  # 8-bit is derived from 4 and 2
PASSES_PER_PACKED_BYTE = 24.0  # read, noise, scale, round, pack, then unpack and rescale: bytes moved / byte saved


@dataclass
class Unit:
    name: str
    kind: str  # "block" (checkpoint or compress) or "layer" (compress only)
    flops: int = 0  # forward FLOPs
    saved: dict[str, int] = field(default_factory=dict)  # option -> saved bytes

    def options(self) -> tuple[str, ...]:
        return OPTIONS if self.kind == "block" else ("plain", *COMPRESS)


@dataclass
class UnitTable:
    """Per-unit saved bytes by option, the step's fixed bytes and each all-one-option run's peak
    (steps without warm-up: optimizer state is not there yet; only differences are used)."""

    units: list[Unit]
    peaks: dict[str, int]  # option applied everywhere -> tensor peak of the step
    fixed_bytes: int  # parameters + gradients + optimizer state
    flops: int  # forward FLOPs of the whole model


def find_units(model: nn.Module) -> list[Unit]:
    ck = parse_spec("checkpoint")
    handler = handler_for(ck)
    units: list[Unit] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if handler.eligible(name, m, ck):
            units.append(Unit(name, "block"))
            taken.append(name)
    for name, m in model.named_modules():
        if name and isinstance(m, LAYER_TYPES) and not any(name.startswith(t + ".") for t in taken):
            units.append(Unit(name, "layer"))
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
    """Run one fake step per option (applied to every unit that has it) and split saved bytes by unit."""
    units = units if units is not None else find_units(model)
    peaks: dict[str, int] = {}
    flops: dict[str, int] = {}
    for option in RUN_OPTIONS:
        m = copy.deepcopy(model)
        layers = {u.name: option for u in units if option != "plain" and option in u.options()}
        apply_plan_(m, Plan(layers=layers))
        ranges: dict[str, list[int]] = {}
        hooks = _range_hooks(m, units, ranges) + (flop_hooks(m, flops) if option == "plain" else [])
        try:
            with _quiet_fake_tensor_log():
                rep = tracked_step(m, dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, micro_batches=1)), fake=True, warmup=False)  # fmt: skip
        finally:
            for h in hooks:
                h.remove()
        peaks[option] = rep.peak_bytes
        for u in units:
            a, b = ranges.get(u.name, [0, 0])
            u.saved[option] = sum(rep.sizes[r] for r in range(a, b) if rep.categories[r] == "activations")
    for u in units:
        # 8-bit from the 4- and 2-bit runs: codes grow linearly with bits, metadata does not
        s4, s2 = u.saved["compress:bits=4"], u.saved["compress:bits=2"]
        u.saved["compress:bits=8"] = s4 + 2 * (s4 - s2)
        u.flops = sum(v for k, v in flops.items() if k == u.name or k.startswith(u.name + "."))
    return UnitTable(units, peaks, fixed_bytes(model, spec.optimizer), sum(flops.values()))


def fixed_bytes(model: nn.Module, optimizer: str) -> int:
    """Parameters and buffers, plus gradients and optimizer state of the trainable ones."""
    every = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return every + trainable * (1 + (2 if optimizer == "adamw" else 1))


def option_seconds(unit: Unit, option: str, profile: DeviceProfile | None) -> float:
    """Extra step time of `option` on `unit`: a second forward (checkpoint), or packing traffic."""
    gflops = (profile.fp32_gflops if profile else None) or 100.0
    bandwidth = (profile.memory_bandwidth_gbs if profile else None) or 10.0
    if option == "checkpoint":
        return unit.flops / (gflops * 1e9)
    if option.startswith("compress"):
        return PASSES_PER_PACKED_BYTE * unit.saved["plain"] / (bandwidth * 1e9)
    return 0.0


def step_seconds(table: UnitTable, profile: DeviceProfile | None) -> float:
    """Plain step time: forward + backward FLOPs over throughput, plus activation traffic."""
    gflops = (profile.fp32_gflops if profile else None) or 100.0
    bandwidth = (profile.memory_bandwidth_gbs if profile else None) or 10.0
    saved = sum(u.saved["plain"] for u in table.units)
    return 3 * table.flops / (gflops * 1e9) + 4 * saved / (bandwidth * 1e9)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
