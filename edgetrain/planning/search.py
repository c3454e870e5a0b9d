"""`plan_for()`: the configuration that fits the device at the least cost.

Per unit (block or leftover layer) one option among plain and what the registered per-unit
methods offer there; step-wide, one config or none from each registered step-wide method. The
planner reads them through the handler protocol (methods/base.py) and names none of them. For
each step-wide setting the
per-unit choice is a multiple-choice knapsack (saved bytes against the activation budget,
cost = predicted time overhead + risk weight), solved exactly by dynamic programming over
byte buckets. The cheapest setting's plan is then verified with an exact fake-tensor estimate;
if the estimate says it does not fit, the knapsack is solved again with the overshoot taken off.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.memory.predict import num_classes_of
from edgetrain.methods.base import (
    METHODS,
    MethodConfig,
    StepEffect,
    as_config,
    handler_for,
    list_methods,
    planned_handlers,
    prepare,
    spec_of,
)  # fmt: skip
from edgetrain.planning.estimate import Estimate, estimate
from edgetrain.planning.knapsack import knapsack, pareto
from edgetrain.planning.record import Choices, Plan, PlanRequest, apply_plan_, param_shapes
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
MiB = 2**20


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

    def fixed(self, f: Fixed, largest_gradient: int = 0) -> int:
        """Fixed bytes held at the peak under this setting. Gradients accumulated over micro-batches
        are all held, whatever frees them later; and the largest gradient is whole at some time."""
        scale = 1.0 if self.divisor > 1 else math.prod(e.gradient_scale for e in self.effects)
        grads = max(int(f.gradients * scale), min(f.gradients, largest_gradient))
        return f.params + grads + int(f.state * math.prod(e.state_scale for e in self.effects))

    def activations(self, nbytes: int, keeps_dtype: bool = True) -> int:
        """Saved bytes under this setting (dtype-keeping ones scale with the precision)."""
        for e in self.effects:
            if keeps_dtype and e.activation_scale != 1.0:
                nbytes = int(nbytes * e.activation_scale)
        return nbytes // self.divisor


def step_wide_options(profile: DeviceProfile, batch_size: int, has_bn: bool = True) -> list[StepWide]:
    """Every combination of one config or none per step-wide method (registration order: the
    first varies slowest), from no change at all to every method at its most saving."""
    per_method = [[None, *h.step_candidates(profile, batch_size)] for h in planned_handlers("step")]
    out = []
    for combo in itertools.product(*per_method):
        configs = tuple(c for c in combo if c is not None)
        effects = tuple(handler_for(c).step_effect(c, profile, has_bn) for c in configs)
        out.append(StepWide(configs, effects))
    return out


def _risk(option: Option) -> int:
    return 0 if option is None else int(option.risk)


class Planner:
    """Holds the unit table of one model/step and answers for each step-wide setting."""

    def __init__(self, model: nn.Module, spec: StepSpec, profile: DeviceProfile, prefer: str, plain: Estimate):
        self.model, self.spec, self.profile, self.weight = model, spec, profile, PREFER[prefer]
        self.plain = plain
        self.table: UnitTable = unit_table(model, spec)
        self.t0 = step_seconds(self.table, profile)
        self.top = [u for u in self.table.units if u.parent is None]
        self.inside = {r.name: [u for u in self.table.units if u.parent == r.name] for r in self.top}
        self.by_name = {u.name: u for u in self.table.units}
        self.total_saved = sum(u.saved[None] for u in self.top) or 1
        # the device level over the tensor level (allocator rounding and fragmentation), from plain
        self.workspace = profile.workspace_bytes
        self.device_ratio = max(
            1.0, (plain.predicted.peak_device_bytes - self.workspace) / plain.predicted.peak_total_bytes
        )
        self.has_bn = has_batchnorm(model)

    def _saved(self, option: Option, unit: Unit, g: StepWide) -> int:
        keeps = option is None or handler_for(option).keeps_dtype(option)
        return g.activations(unit.saved[option], keeps)

    def _bytes(self, option: Option, unit: Unit, g: StepWide) -> int:
        """What `option` holds on `unit`: its saved activations, and its fixed bytes over plain's."""
        return self._saved(option, unit, g) + g.fixed(unit.fixed[option]) - g.fixed(unit.fixed[None])

    def _choices(self, u: Unit, g: StepWide, budget: float) -> list[tuple[dict[str, Option], int, float]]:
        return [({u.name: o}, self._bytes(o, u, g), self._cost(u, o)) for o in u.options if self._floor(o, g) <= budget]

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
        share = unit.saved[None] / self.total_saved
        return option_seconds(unit, option, self.profile) / self.t0 + self.weight * _risk(option) * share

    def least_fixed(self, g: StepWide) -> int:
        """The least fixed bytes any plan under `g` holds (every unit at its lightest weights)."""
        units = self.table.units
        return g.fixed(self.table.fixed) + sum(
            min(g.fixed(u.fixed[o]) - g.fixed(u.fixed[None]) for o in u.options) for u in units
        )

    def _floor(self, option: Option, g: StepWide) -> int:
        """A peak no plan using `option` goes below (the all-`option` run's, when above its linear model)."""
        if option is None or option not in self.table.acts:
            return 0
        return self.device_bytes(self.least_fixed(g) + max(0, self.table.acts[option]) // g.divisor)

    def device_bytes(self, tensor_bytes: int) -> int:
        return int(tensor_bytes * self.device_ratio) + self.workspace

    def tensor_bytes(self, device_bytes: int) -> int:
        return int((device_bytes - self.workspace) / self.device_ratio)

    def global_cost(self, g: StepWide) -> tuple[float, float]:
        """(cost, time factor) of a step-wide setting."""
        factor = math.prod(e.time_factor for e in g.effects)
        risk = sum(e.risk for e in g.effects)
        return factor - 1 + self.weight * risk, factor

    def least_peak(self, g: StepWide) -> int:
        """The modelled tensor peak under `g` with every unit at its lightest option."""
        plain_act = self.plain.predicted.peak_total_bytes - self.table.fixed.total
        least = sum(min(b for _, b, _ in group) for group in self.groups(g)) - self._plain_saved(g)
        return g.fixed(self.table.fixed, self.table.largest_gradient) + g.activations(plain_act) + least

    def _plain_saved(self, g: StepWide) -> int:
        return sum(self._saved(None, u, g) for u in self.top)

    def solve(self, g: StepWide, budget: int) -> tuple[dict[str, Option], float, float] | None:
        """Per-unit options under setting `g` whose modelled device peak fits `budget`:
        ({unit: option}, cost, predicted time factor); None when none does."""
        plain_act = self.plain.predicted.peak_total_bytes - self.table.fixed.total
        act_budget = self.tensor_bytes(budget) - g.fixed(self.table.fixed, self.table.largest_gradient)
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


def plan_for(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    device: DeviceProfile | str = "cpu",
    optimizer: str = "sgd",
    prefer: str = "speed",
    name: str = "model",
    num_classes: int | None = None,
    budget_bytes: int | None = None,
    methods: Sequence[MethodConfig | str] = (),
) -> Plan:
    """The least-cost plan whose predicted device peak fits `device` (or `budget_bytes`).

    Plain when the model fits as it is; `BudgetError` with the smallest reachable peak and what
    would make it fit when nothing does. `methods`: structural methods (low-rank layers) the user
    chose; they are applied first and the search plans the factorized model."""
    if prefer not in PREFER:
        raise ConfigError(f"--prefer must be speed or accuracy, got {prefer!r}")
    profile = get_device(device)
    configs = [as_config(m) for m in methods]
    for c in configs:
        if not c.structural:
            raise ConfigError(f"method '{spec_of(c)}' is one the planner chooses itself: give only low-rank "
                              f"methods ({', '.join(_structural())}), or force everything with fit --method")  # fmt: skip
    if configs:
        model = prepare(model, configs, shapes_only=True)[0]
    base = " + ".join(map(spec_of, configs)) or "plain"
    request = PlanRequest(name, tuple(input_shape), batch_size, optimizer, profile.name,
                          budget_bytes or profile.usable_memory_bytes, prefer)  # fmt: skip
    chosen = _search(model, request, profile, num_classes, base)
    return _with_low_rank(chosen, configs) if configs else chosen


def _structural() -> list[str]:
    return [n for n in list_methods() if METHODS.get(n).config_type.structural]


def _with_low_rank(chosen: Plan, configs: list[MethodConfig]) -> Plan:
    """The factorized model's plan as a plan of the model given: low-rank methods first, their risk
    counted, and each candidate named with them (the first row, the base, already is)."""
    chosen.choices.methods = [*configs, *chosen.choices.methods]
    risk = max(int(c.risk) for c in configs)
    chosen.risk = max(chosen.risk, risk)
    for row in chosen.candidates[1:]:
        row["plan"] = f"{' + '.join(map(spec_of, configs))} + {row['plan']}"
    for row in chosen.candidates:
        if "risk" in row:
            row["risk"] = max(row["risk"], risk)
    return chosen


def _search(model: nn.Module, request: PlanRequest, profile: DeviceProfile, num_classes: int | None, base: str) -> Plan:
    """The search on `model` as given; `base` names it (plain, or the low-rank methods applied)."""
    budget = request.budget_bytes
    plain = _exact(model, Choices(), request, profile, num_classes)
    doc = Plan(request)
    row = {"plan": base, "peak_device_bytes": plain.predicted.peak_device_bytes, "overhead": 1.0, "risk": 0,
           "peak_by_category": plain.predicted.peak_by_category}  # fmt: skip
    if plain.predicted.peak_device_bytes <= budget:
        row["fits"] = row["chosen"] = True
        why = (
            "fits as it is: no method, no overhead"
            if base == "plain"
            else f"fits with {base} alone: nothing more needed"
        )
        return _finish(doc, Choices(), plain, 1.0, [row], [why])
    row["fits"] = False
    spec = StepSpec(request.input_shape, request.batch_size, num_classes or num_classes_of(model), request.optimizer)
    planner = Planner(model, spec, profile, request.prefer, plain)
    rows, found = [row], []
    for g in step_wide_options(profile, request.batch_size, planner.has_bn):
        got = planner.solve(g, budget)
        if got is None:
            rows.append({"plan": g.label() + " (nothing fits)", "fits": False})
            continue
        found.append((got[1], g, got))
    found = _undominated(found)
    for i, (_, g, got) in enumerate(found):
        verified = _verify(planner, g, got, budget, lambda c: _exact(model, c, request, profile, num_classes))
        if verified is None:
            rows.append({"plan": g.label() + ": modelled to fit, over budget in the exact check", "fits": False})
            continue
        cand, est, factor = verified
        rows.append({**_row(cand, est, factor, True), "chosen": True})
        for _, g2, (ch2, _, f2) in found[i + 1 :]:  # costlier step-wide settings, as modelled, for the table
            p2 = planner.to_choices(g2, ch2)  # not estimated: "fits" is None (modelled to fit, not checked)
            rows.append(
                {"plan": p2.summary(), "peak_device_bytes": None, "overhead": f2, "risk": _plan_risk(p2), "fits": None}
            )
        return _finish(doc, cand, est, factor, rows, _reasons(planner, g, cand, est, budget, base))
    g, p, est = _lightest(planner, request.batch_size, lambda c: _exact(model, c, request, profile, num_classes))
    if est.predicted.peak_device_bytes <= budget:  # the linear model erred high; the exact check says it fits
        rows.append({**_row(p, est, planner.global_cost(g)[1], True), "chosen": True})
        why = "the modelled plans did not fit; the lightest plan, estimated exactly, does"
        return _finish(doc, p, est, planner.global_cost(g)[1], rows, [why, *_reasons(planner, g, p, est, budget, base)])
    raise _not_fit(planner, request, g, p, est)


def _undominated(found: list[tuple[float, StepWide, tuple]]) -> list[tuple[float, StepWide, tuple]]:
    """Step-wide settings by cost, less those that choose the same per-unit options as a setting made
    of some of their configs, at no less cost: a config that changes nothing modelled is dropped."""
    found = sorted(found, key=lambda f: f[0])
    keep: list[tuple[float, StepWide, tuple]] = []
    for f in found:
        if not any(set(k[1].configs) < set(f[1].configs) and k[2][0] == f[2][0] for k in keep):
            keep.append(f)
    return keep


def _exact(model: nn.Module, choices: Choices, request: PlanRequest, profile: DeviceProfile, num_classes) -> Estimate:
    return estimate_plan(model, choices, request.input_shape, request.batch_size, request.optimizer, profile,
                         num_classes, request.model)  # fmt: skip


def _verify(planner: Planner, g: StepWide, got: tuple, budget: int, exact) -> tuple[Choices, Estimate, float] | None:
    """Exact estimate of the plan; on overshoot solve again with the overshoot taken off (3 tries)."""
    target = budget
    for _ in range(3):
        chosen, _, factor = got
        cand = planner.to_choices(g, chosen)
        est = exact(cand)
        over = est.predicted.peak_device_bytes - budget
        if over <= 0:
            return cand, est, factor
        target -= over + budget // 100
        got = planner.solve(g, target)
        if got is None:
            return None
    return None


def estimate_plan(
    model, plan: Plan | Choices, input_shape, batch_size, optimizer, profile, num_classes=None, name="model"
) -> Estimate:
    """`estimate` of a model with a plan's choices applied (fake tensors, nothing allocated)."""
    choices = plan.choices if isinstance(plan, Plan) else plan
    m = copy.deepcopy(model)
    apply_plan_(m, Choices([c for c in choices.methods if c.structural], choices.layers))
    rest = [c for c in choices.methods if not c.structural]
    est = estimate(m, input_shape, batch_size, optimizer, profile, rest, num_classes, name)
    est.methods = [choices.summary()]
    return est


def _plan_risk(p: Choices) -> int:
    return max([0, *(int(c.risk) for c in p.configs())])


def _row(p: Choices, est: Estimate, factor: float, fits: bool) -> dict:
    return {"plan": p.summary(), "peak_device_bytes": est.predicted.peak_device_bytes, "overhead": factor,
            "risk": _plan_risk(p), "fits": fits}  # fmt: skip


def _reasons(planner: Planner, g: StepWide, p: Choices, est: Estimate, budget: int, base: str) -> list[str]:
    alone = "plain" if base == "plain" else f"{base} alone"
    out = [f"{alone} needs {planner.plain.predicted.peak_device_bytes / MiB:.0f} MiB, over the budget of "
           f"{budget / MiB:.0f} MiB; this plan: {est.predicted.peak_device_bytes / MiB:.0f} MiB"]  # fmt: skip
    out += [e.reason for e in g.effects if e.reason]
    for u in planner.table.units:
        if u.name in p.layers:
            o = p.layers[u.name]
            cost = option_seconds(u, o, planner.profile) / planner.t0
            out.append(f"{u.name}: {spec_of(o)} keeps {planner._saved(o, u, g) / MiB:.1f} of "
                       f"{planner._saved(None, u, g) / MiB:.1f} MiB for +{cost:.1%} time")  # fmt: skip
            if u.fixed[o] != u.fixed[None]:
                out[-1] += (f"; its weights, gradients and optimizer state: {g.fixed(u.fixed[o]) / MiB:.1f} "
                            f"of {g.fixed(u.fixed[None]) / MiB:.1f} MiB")  # fmt: skip
    return out


def _finish(doc: Plan, chosen: Choices, est: Estimate, factor: float, rows: list[dict], reasons: list[str]) -> Plan:
    doc.choices = chosen
    doc.predicted, doc.overhead, doc.risk = est.predicted, round(factor, 4), _plan_risk(chosen)
    doc.candidates, doc.reasons = rows, reasons
    return doc


def _lightest(planner: Planner, batch_size: int, exact) -> tuple[StepWide, Choices, Estimate]:
    """The plan with the least modelled peak (every unit at its lightest under the lightest step-wide
    setting), estimated exactly."""
    g = min(step_wide_options(planner.profile, batch_size, planner.has_bn), key=planner.least_peak)
    grain = 2**16  # choices within 64 KiB of each other hold the same: the cheaper one is taken
    picks = [min(group, key=lambda e: (e[1] // grain, e[2])) for group in planner.groups(g)]
    p = planner.to_choices(g, {k: v for what, _, _ in picks for k, v in what.items()})
    return g, p, exact(p)


def _not_fit(planner: Planner, request: PlanRequest, g: StepWide, p: Choices, est: Estimate) -> BudgetError:
    """The smallest peak reachable (the lightest plan's), and advice."""
    budget, batch_size, input_shape = request.budget_bytes, request.batch_size, request.input_shape
    peak, device = est.predicted.peak_device_bytes, planner.profile.name
    fixed = planner.least_fixed(g) + planner.workspace  # weights, gradients, optimizer state, workspace
    advice = (
        f"use a smaller model, change its layers (--method: one of {', '.join(_structural())}), a lighter "
        "optimizer, or train fewer layers (the weights, gradients and optimizer state alone do not fit)"
    )
    if fixed < budget:
        per_sample = max(
            1.0, (peak - fixed) / max(1.0, batch_size / g.divisor)
        )  # activations scale with the micro-batch
        fit_micro = int((budget - fixed) / per_sample)
        size = int(input_shape[-1] * math.sqrt(max(0.0, (budget - fixed) / max(1, peak - fixed))))
        advice = (
            f"try -b {fit_micro * g.divisor} (predicted to fit with that plan)"
            if fit_micro >= 1
            else f"try -s {max(size // 8 * 8, 8)} (predicted to fit with that plan)"
        )
    return BudgetError(
        f"nothing fits {device}: the smallest peak reachable is {peak / MiB:.0f} MiB ({p.summary()}) against a "
        f"budget of {budget / MiB:.0f} MiB: {advice}"
    )
