"""The planner's model of a step: per unit the options' bytes and cost, per step-wide setting the
effects of its configs, and the least-cost choice that fits a budget (`Planner.solve`).

Per unit (a run of blocks, a block or a leftover layer) one option among plain and what the
registered per-unit methods offer there; step-wide, one config or none from each registered
step-wide method. For each step-wide setting the per-unit choice is a multiple-choice knapsack
(bytes against what the budget leaves; cost = predicted time overhead + risk weight). `allow`
(`CHANGE_LEVELS`) bounds how much a plan may change the training.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import nn

from edgetrain.core.step import OPTIMIZERS, StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.errors import ConfigError
from edgetrain.levels import CHANGE_LEVELS, DEFAULT_ALLOW
from edgetrain.memory.allocator import replay_cuda
from edgetrain.methods.base import (
    MethodConfig,
    StepEffect,
    change_level,
    handler_for,
    planned_handlers,
    spec_of,
    step_settings_for,
)  # fmt: skip
from edgetrain.planning.estimate import Estimate
from edgetrain.planning.knapsack import knapsack, pareto
from edgetrain.planning.record import Choices, param_shapes
from edgetrain.planning.units import (
    Fixed,
    Option,
    Unit,
    UnitTable,
    has_batchnorm,
    option_seconds,
    step_seconds,
    unit_table,
)  # fmt: skip

PREFER = {"speed": 0.05, "accuracy": 2.0}  # weight of one risk rank against a 100% time overhead
SOLVE_TRIES = 4  # knapsack solves per setting and budget, each lower by what the last went over


@dataclass(frozen=True)
class StepWide:
    """One step-wide setting: a config (or none) from each step-wide method, with their effects."""

    configs: tuple[MethodConfig, ...] = ()
    effects: tuple[StepEffect, ...] = ()

    def methods(self) -> list[str]:
        return [spec_of(c) for c in self.configs]

    def label(self) -> str:
        return "+".join(self.methods()) or "no step-wide method"

    @property
    def divisor(self) -> int:
        """Activations are held for 1/divisor of the batch at a time."""
        return math.prod(e.batch_divisor for e in self.effects)

    def fixed(self, f: Fixed, largest_gradient: int = 0, backward: bool = True) -> int:
        """Fixed bytes held at the peak under this setting. Gradients accumulated over micro-batches
        are all held, whatever frees them later, and in `backward` a micro-batch's new gradient is
        whole beside the one it is added to; the largest gradient is whole at some time."""
        scale = 1.0 if self.divisor > 1 else math.prod(e.gradient_scale for e in self.effects)
        grads = max(int(f.gradients * scale), min(f.gradients, largest_gradient))
        grads += largest_gradient if backward and self.divisor > 1 else 0
        copies = int(f.params * sum(e.param_copies for e in self.effects))
        return f.params + copies + grads + int(f.state * math.prod(e.state_scale for e in self.effects))

    def activations(self, nbytes: int, keeps_dtype: bool = True) -> int:
        """Saved bytes under this setting (dtype-keeping ones scale with the precision)."""
        for e in self.effects:
            if keeps_dtype and e.activation_scale != 1.0:
                nbytes = int(nbytes * e.activation_scale)
        return nbytes // self.divisor


def step_wide_options(profile: DeviceProfile, batch_size: int, has_bn: bool = True) -> list[StepWide]:
    """Every combination of one config or none per step-wide method that a step accepts
    (registration order: the first varies slowest), from no change at all to every method at its
    most saving."""
    per_method = [[None, *h.step_candidates(profile, batch_size)] for h in planned_handlers("step")]
    out = []
    for combo in itertools.product(*per_method):
        configs = tuple(c for c in combo if c is not None)
        try:
            step_settings_for(list(configs))
        except ConfigError:  # a combination a step refuses (the step in backward with fp16's loss scaling)
            continue
        effects = tuple(handler_for(c).step_effect(c, profile, has_bn, batch_size) for c in configs)
        out.append(StepWide(configs, effects))
    return out


FIXED = ("parameters", "gradients", "optimizer")


def _segments_over(plain: Estimate, categories: tuple[str, ...]) -> int:
    """What CUDA's segments hold beyond the tensors of `categories`, replayed alone from plain's step."""
    if plain.report is None:
        return 0
    return max(0, replay_cuda(plain.report, categories) - plain.report.peak_of(categories))


def _risk(option: Option) -> int:
    return 0 if option is None else int(option.risk)


class Planner:
    """Holds the unit table of one model/step and answers for each step-wide setting."""

    def __init__(self, model: nn.Module, spec: StepSpec, profile: DeviceProfile, prefer: str, plain: Estimate,
                 allow: str = DEFAULT_ALLOW, processes: int = 1, known: UnitTable | None = None):  # fmt: skip
        self.model, self.spec, self.profile, self.weight = model, spec, profile, PREFER[prefer]
        self.plain, self.allow, self.prefer, self.processes = plain, allow, prefer, processes
        self.max_risk: int | None = None  # a search pass's cap on a config's risk (None: the level's own)
        self.table: UnitTable = unit_table(model, spec, keep=self.allowed, known=known)
        self.t0 = step_seconds(self.table, profile)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # registration: forward order, as a rule
        units = sorted(self.table.units, key=lambda u: order.get(u.name, len(order)))
        self.top = [u for u in units if u.parent is None]
        self.inside = {r.name: [u for u in units if u.parent == r.name] for r in self.top}
        self.by_name = {u.name: u for u in self.table.units}
        self.total_saved = sum(u.saved[None] for u in self.top) or 1
        # the device level over the tensor level, from plain: CUDA's segments around the fixed bytes
        # (their own replay: a ratio of them), and its fragmentation, which grows with what comes and
        # goes beside them (a ratio of that); a CPU's ops' inner copies are one op's operands (bytes on top)
        self.workspace = profile.workspace_bytes
        over = plain.predicted.peak_device_bytes - self.workspace - plain.predicted.peak_total_bytes
        cuda = profile.allocator == "cuda-caching"
        fixed, churn = max(1, self.table.fixed.total), max(1, plain.predicted.peak_total_bytes - self.table.fixed.total)
        fixed_over = min(over, _segments_over(plain, FIXED)) if cuda else 0
        self.fixed_ratio = fixed_over / fixed
        self.churn_ratio = max(0.0, (over - fixed_over) / churn) if cuda else 0.0
        self.device_extra = 0 if cuda else max(0, over)
        self.has_bn = has_batchnorm(model)
        self.inputs = plain.predicted.peak_by_category.get("inputs", 0)  # the batch: micro-batches are its views
        self.slots = OPTIMIZERS.get(spec.optimizer, 1)  # optimizer-state tensors per parameter
        rise = plain.report.rise_in("optimizer") if plain.report is not None else 0  # torch's step's temporaries,
        self.step_rise = rise / max(1, self.table.fixed.largest)  # in largest parameters
        self._least: dict[tuple[StepWide, str], int] = {}  # least_fixed by setting and level (this table's)

    def _saved(self, option: Option, unit: Unit, g: StepWide) -> int:
        keeps = option is None or handler_for(option).keeps_dtype(option)
        return g.activations(unit.saved[option], keeps)

    def _bytes(self, option: Option, unit: Unit, g: StepWide) -> int:
        """What `option` holds on `unit`: its saved activations, and its fixed bytes over plain's."""
        return self._saved(option, unit, g) + g.fixed(unit.fixed[option]) - g.fixed(unit.fixed[None])

    def at(self, allow: str) -> Planner:
        """The same question at another change level (only the options this one lacks are measured)."""
        return Planner(self.model, self.spec, self.profile, self.prefer, self.plain, allow, self.processes, self.table)

    def allowed(self, config: MethodConfig | None, risk: int | None = None) -> bool:
        """Whether `config` changes the training no more than `allow` lets it (and, with several
        processes, whether DDP can follow its backward)."""
        if config is None:
            return True
        if self.processes > 1 and not handler_for(config).replicas_ok:
            return False
        if self.max_risk is not None and (config.risk if risk is None else risk) > self.max_risk:
            return False
        return CHANGE_LEVELS.index(change_level(config, risk)) <= CHANGE_LEVELS.index(self.allow)

    def settings(self) -> list[StepWide]:
        """The step-wide settings allowed (a config's risk as its effect on this model says)."""
        every = step_wide_options(self.profile, self.spec.batch_size, self.has_bn)
        return [g for g in every if all(self.allowed(c, e.risk) for c, e in zip(g.configs, g.effects, strict=True))]

    def _transient(self, option: Option, unit: Unit, g: StepWide) -> int:
        """What `option` holds again on `unit` while the unit's backward runs (recompute)."""
        if option is None:
            return 0
        return g.activations(handler_for(option).backward_transient(option, unit.saved[None]))

    def _choices(self, u: Unit, g: StepWide, budget: float) -> list[tuple[dict[str, Option], int, float]]:
        return [({u.name: o}, self._bytes(o, u, g), self._cost(u, o)) for o in u.options
                if self.allowed(o) and max(self._floor(o, g), self._unit_floor(o, u, g)) <= budget]  # fmt: skip

    def _unit_floor(self, option: Option, unit: Unit, g: StepWide) -> int:
        """A peak no plan with `option` on `unit` goes below: the least fixed bytes, the batch, and
        the unit's own bytes during its backward (what it saved and what it holds again)."""
        if option is None:
            return 0
        own = self._saved(option, unit, g) + self._transient(option, unit, g)
        return self.device_bytes(self.least_fixed(g) + self.inputs + own)

    def groups(self, g: StepWide, budget: float = math.inf) -> list[list[tuple[dict[str, Option], int, float]]]:
        """Per outermost unit the choices allowed: (option by unit, bytes, cost). A run of blocks offers
        its own options, and the Pareto front of the joint options of the units inside it."""
        out = []
        for u in self.top:
            mine = self._choices(u, g, budget)
            inside = self.inside.get(u.name)
            if inside:
                rest = self._saved(None, u, g) - sum(self._saved(None, c, g) for c in inside)
                joint = pareto([self._choices(c, g, budget) for c in inside])
                mine = [m for m in mine if m[0][u.name] is not None]
                mine += [({k: v for d in w for k, v in d.items()}, rest + b, c) for w, b, c in joint]
            out.append(mine)
        return out

    def _cost(self, unit: Unit, option: Option) -> float:
        # risk weighs by the unit's share of the activations; a change of the layers weighs whole
        share = 1.0 if option is not None and option.structural else unit.saved[None] / self.total_saved
        return option_seconds(unit, option, self.profile) / self.t0 + self.weight * _risk(option) * share

    def least_fixed(self, g: StepWide) -> int:
        """The least fixed bytes any plan under `g` holds (every unit at its lightest weights)."""
        if (g, self.allow) not in self._least:
            self._least[(g, self.allow)] = self._least_fixed(g)
        return self._least[(g, self.allow)]

    def _least_fixed(self, g: StepWide, backward: bool = True) -> int:
        units = self.table.units
        return g.fixed(self.table.fixed, self.largest(), backward) + sum(
            min(g.fixed(u.fixed[o]) - g.fixed(u.fixed[None]) for o in u.options if self.allowed(o)) for u in units
        )

    def largest(self, chosen: dict[str, Option] | None = None) -> int:
        """The largest trainable parameter's bytes with per-unit options `chosen` (None: the least
        any plan has): a micro-batch's new gradient of it, and the optimizer's temporaries, are whole."""
        return max([self.table.outside_largest, *(self._unit_largest(u, chosen) for u in self.top)])

    def _unit_largest(self, u: Unit, chosen: dict[str, Option] | None) -> int:
        inside = self.inside.get(u.name, [])
        if chosen is None:
            own = min(u.fixed[o].largest for o in u.options if self.allowed(o))
            return min(own, max(self._unit_largest(c, None) for c in inside)) if inside else own
        option = chosen.get(u.name)
        if option is not None or not inside:
            return u.fixed[option].largest
        return max(self._unit_largest(c, chosen) for c in inside)

    def _floor(self, option: Option, g: StepWide) -> int:
        """A peak no plan using `option` goes below (the all-`option` run's, when above its linear model)."""
        if option is None or option not in self.table.acts:
            return 0
        return self.device_bytes(self.least_fixed(g) + max(0, self.table.acts[option]) // g.divisor)

    def device_bytes(self, tensor_bytes: int) -> int:
        """The device level of a tensor peak (see `__init__`)."""
        fixed = self.table.fixed.total
        over = min(tensor_bytes, fixed) * self.fixed_ratio + max(0, tensor_bytes - fixed) * self.churn_ratio
        return tensor_bytes + int(over) + self.device_extra + self.workspace

    def tensor_bytes(self, device_bytes: int) -> int:
        """The tensor peak whose device level is `device_bytes` (`device_bytes`'s inverse)."""
        t = device_bytes - self.workspace - self.device_extra
        fixed = self.table.fixed.total
        if t <= fixed * (1 + self.fixed_ratio):
            return int(t / (1 + self.fixed_ratio))
        return fixed + int((t - fixed * (1 + self.fixed_ratio)) / (1 + self.churn_ratio))

    def global_cost(self, g: StepWide) -> tuple[float, float]:
        """(cost, time factor) of a step-wide setting."""
        factor = math.prod(e.time_factor for e in g.effects)
        risk = sum(e.risk for e in g.effects)
        return factor - 1 + self.weight * risk, factor

    def least_peak(self, g: StepWide) -> int:
        """The modelled tensor peak under `g` with every unit at the option that holds least: its
        `modelled_peak`, or the floor of an option it uses (its forward's transients), if higher."""
        picks = [min(group, key=lambda e: e[1]) for group in self.groups(g)]
        least = self.modelled_peak(g, {k: v for what, _, _ in picks for k, v in what.items()})
        used = {o for what, _, _ in picks for o in what.values() if o is not None and o in self.table.acts}
        floors = [self.least_fixed(g) + self.inputs + max(0, self.table.acts[o]) // g.divisor for o in used]
        return max([least, self.least_fixed(g) + self.inputs, *floors, self.optimizer_peak(g)])

    def optimizer_peak(self, g: StepWide, chosen: dict[str, Option] | None = None) -> int:
        """The optimizer step's tensor peak under `g` with per-unit options `chosen` (None: the least
        any plan has): the fixed bytes, the batch, and the step's own temporaries (a config's that
        changes how the step runs, else torch's as measured in plain), in largest parameters."""
        largest = self.largest(chosen)
        temps = [e.step_temps for e in g.effects if e.step_temps is not None]
        rise = int((max(temps) * self.slots if temps else self.step_rise) * largest)
        if chosen is None:
            return self._least_fixed(g, backward=False) + self.inputs + rise
        fixed = g.fixed(self.table.fixed, largest, backward=False) + sum(
            g.fixed(self.by_name[n].fixed[o]) - g.fixed(self.by_name[n].fixed[None]) for n, o in chosen.items()
        )
        return fixed + self.inputs + rise

    def modelled_peak(self, g: StepWide, chosen: dict[str, Option]) -> int:
        """The tensor peak of per-unit options `chosen` under `g` (what `solve` fits): the linear
        model's (everything saved is held at the end of forward); or, if higher, a unit's backward
        with what it holds again (recompute) beside what the units before it hold; or the optimizer
        step's. The weights an option changes (a layer made low-rank) are changed at every point, not
        from that unit on."""
        order = self._in_order(g, chosen)
        base = self._base(g, chosen) - self._plain_saved(g) + sum(weights for _, weights, _ in order)
        held, peaks = 0, [self.optimizer_peak(g, chosen)]
        for saved, _, transient in order:
            held += saved
            if transient:
                peaks.append(base + held + transient)
        return max(base + held, *peaks)

    def _in_order(self, g: StepWide, chosen: dict[str, Option]) -> list[tuple[int, int, int]]:
        """(saved bytes, weights' bytes over plain's, bytes held again in its backward) per unit in
        forward order; a run left to the units inside it holds its own rest first."""
        out = []
        for u in self.top:
            inside = self.inside.get(u.name, [])
            if chosen.get(u.name) is not None or not inside:
                out.append(self._held(u, chosen.get(u.name), g))
            else:  # a run left to the units inside it
                out.append((self._saved(None, u, g) - sum(self._saved(None, c, g) for c in inside), 0, 0))
                out += [self._held(c, chosen.get(c.name), g) for c in inside]
        return out

    def _held(self, u: Unit, o: Option, g: StepWide) -> tuple[int, int, int]:
        saved = self._saved(o, u, g)
        return saved, self._bytes(o, u, g) - saved, self._transient(o, u, g)

    def _plain_act(self) -> int:
        """Plain's tensor peak in forward and backward (the optimizer step's is `optimizer_peak`'s) less
        its fixed bytes and the input batch (whole however it is split)."""
        report, peak = self.plain.report, self.plain.predicted.peak_total_bytes
        if report is not None and report.events:
            peak = report.peak_in(("forward", "backward")) + self.plain.predicted.peak_by_category.get("unseen", 0)
        return peak - self.table.fixed.total - self.inputs

    def _base(self, g: StepWide, chosen: dict[str, Option] | None = None) -> int:
        """The modelled tensor peak under `g` with every unit plain (its largest parameter as under
        `chosen`, or the least any plan has)."""
        fixed = g.fixed(self.table.fixed, self.largest(chosen))
        return fixed + g.activations(self._plain_act()) + self.inputs

    def _plain_saved(self, g: StepWide) -> int:
        return sum(self._saved(None, u, g) for u in self.top)

    def solve(self, g: StepWide, budget: int) -> tuple[dict[str, Option], float, float] | None:
        """Per-unit options under setting `g` whose modelled device peak fits `budget`:
        ({unit: option}, cost, predicted time factor); None when none does. The knapsack fits the
        linear model; a plan whose recompute or optimizer step goes over is solved again lower."""
        if self.device_bytes(self.optimizer_peak(g)) > budget:
            return None
        target = budget
        for _ in range(SOLVE_TRIES):
            got = self._knapsack(g, budget, target)
            if got is None:
                return None
            over = self.device_bytes(self.modelled_peak(g, got[0])) - budget
            if over <= 0:
                return got
            target -= over
        return None

    def _knapsack(self, g: StepWide, budget: int, target: int) -> tuple[dict[str, Option], float, float] | None:
        """The least-cost per-unit options allowed under `budget` whose linear model fits `target`."""
        plain_act = self._plain_act()
        act_budget = self.tensor_bytes(target) - g.fixed(self.table.fixed, self.largest()) - self.inputs
        groups = self.groups(g, budget)
        if not all(groups):
            return None
        shift = [min(b for _, b, _ in group) for group in groups]  # the knapsack's weights are not negative
        items = [[(b - lo, c) for _, b, c in group] for group, lo in zip(groups, shift, strict=True)]
        # linear model: act = base_act - plain_saved + sum(bytes of choice) <= act_budget
        got = knapsack(items, act_budget - g.activations(plain_act) + self._plain_saved(g) - sum(shift))
        if got is None:
            return None
        choice, cost = got
        chosen = {k: v for group, i in zip(groups, choice, strict=True) for k, v in group[i][0].items()}
        extra = sum(option_seconds(self.by_name[n], o, self.profile) for n, o in chosen.items()) / self.t0
        gcost, factor = self.global_cost(g)
        return chosen, cost + gcost, factor * (1 + extra)

    def to_choices(self, g: StepWide, chosen: dict[str, Option]) -> Choices:
        mods = dict(self.model.named_modules())
        layers = {n: o for n, o in chosen.items() if o is not None}
        return Choices(list(g.configs), layers, {n: param_shapes(mods[n]) for n in layers})
