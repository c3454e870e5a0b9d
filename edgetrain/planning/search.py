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
from edgetrain.planning.record import Choices, Plan, PlanRequest, apply_plan_, param_shapes
from edgetrain.planning.units import Option, Unit, UnitTable, has_batchnorm, option_seconds, step_seconds, unit_table

PREFER = {"speed": 0.05, "accuracy": 2.0}  # weight of one risk rank against a 100% time overhead
BUCKETS = 512
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

    def activations(self, nbytes: int, keeps_dtype: bool = True) -> int:
        """Saved bytes under this setting (dtype-keeping ones scale with the precision)."""
        for e in self.effects:
            if keeps_dtype and e.activation_scale != 1.0:
                nbytes = int(nbytes * e.activation_scale)
        return nbytes // self.divisor


def knapsack(
    items: list[list[tuple[int, float]]], capacity: int, buckets: int = BUCKETS
) -> tuple[list[int], float] | None:
    """One option per unit (bytes, cost) minimising total cost with total bytes <= capacity.
    Bytes are rounded up to capacity/buckets, so a returned choice always fits. None: nothing fits."""
    if capacity < 0:
        return None
    q = max(capacity, 1) / buckets
    inf = float("inf")
    dp = [0.0] * (buckets + 1)  # dp[j]: least cost of the units so far within j buckets
    back: list[list[int]] = []
    for opts in items:
        w = [math.ceil(b / q - 1e-9) for b, _ in opts]
        new, pick = [inf] * (buckets + 1), [-1] * (buckets + 1)
        for j in range(buckets + 1):
            for k, (wk, (_, c)) in enumerate(zip(w, opts, strict=True)):
                if wk <= j and dp[j - wk] + c < new[j]:
                    new[j], pick[j] = dp[j - wk] + c, k
        dp = new
        back.append(pick)
    if dp[buckets] == inf:
        return None
    choice, j = [], buckets
    for opts, pick in zip(reversed(items), reversed(back), strict=True):
        k = pick[j]
        choice.append(k)
        j -= math.ceil(opts[k][0] / q - 1e-9)
    return choice[::-1], dp[buckets]


def brute_force(items: list[list[tuple[int, float]]], capacity: int, buckets: int = BUCKETS) -> float | None:
    """The same problem by enumeration (tests check `knapsack` against it on small cases)."""
    q = max(capacity, 1) / buckets
    best = None
    for combo in itertools.product(*[range(len(o)) for o in items]):
        w = sum(math.ceil(items[u][k][0] / q - 1e-9) for u, k in enumerate(combo))
        c = sum(items[u][k][1] for u, k in enumerate(combo))
        if w <= buckets and (best is None or c < best):
            best = c
    return best


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
        self.total_saved = sum(u.saved[None] for u in self.table.units) or 1
        # the device level over the tensor level (allocator rounding and fragmentation), from plain
        self.workspace = profile.workspace_bytes
        self.device_ratio = max(
            1.0, (plain.predicted.peak_device_bytes - self.workspace) / plain.predicted.peak_total_bytes
        )
        self.has_bn = has_batchnorm(model)

    def _saved(self, option: Option, unit: Unit, g: StepWide) -> int:
        keeps = option is None or handler_for(option).keeps_dtype(option)
        return g.activations(unit.saved[option], keeps)

    def _items(self, g: StepWide, budget: int) -> tuple[list[list[Option]], list[list[tuple[int, float]]]]:
        opts, items = [], []
        for u in self.table.units:
            allowed = [o for o in u.options if self._floor(o, g) <= budget]
            opts.append(allowed)
            items.append([(self._saved(o, u, g), self._cost(u, o)) for o in allowed])
        return opts, items

    def _cost(self, unit: Unit, option: Option) -> float:
        share = unit.saved[None] / self.total_saved
        return option_seconds(unit, option, self.profile) / self.t0 + self.weight * _risk(option) * share

    def _floor(self, option: Option, g: StepWide) -> int:
        """A peak no plan using `option` goes below (the all-`option` run's, when above its linear model)."""
        if option is None or option not in self.table.peaks:
            return 0
        fixed = self.table.fixed_bytes
        return self.device_bytes(fixed + max(0, self.table.peaks[option] - fixed) // g.divisor)

    def device_bytes(self, tensor_bytes: int) -> int:
        return int(tensor_bytes * self.device_ratio) + self.workspace

    def tensor_bytes(self, device_bytes: int) -> int:
        return int((device_bytes - self.workspace) / self.device_ratio)

    def global_cost(self, g: StepWide) -> tuple[float, float]:
        """(cost, time factor) of a step-wide setting."""
        factor = math.prod(e.time_factor for e in g.effects)
        risk = sum(e.risk for e in g.effects)
        return factor - 1 + self.weight * risk, factor

    def solve(self, g: StepWide, budget: int) -> tuple[dict[str, Option], float, float] | None:
        """Per-unit options under setting `g` whose modelled device peak fits `budget`:
        ({unit: option}, cost, predicted time factor); None when none does."""
        plain_act = self.plain.predicted.peak_total_bytes - self.table.fixed_bytes
        act_budget = self.tensor_bytes(budget) - self.table.fixed_bytes
        base_act = g.activations(plain_act)
        opts, items = self._items(g, budget)
        plain_saved = sum(self._saved(None, u, g) for u in self.table.units)
        # linear model: act = base_act - plain_saved + sum(saved of choice) <= act_budget
        got = knapsack(items, act_budget - base_act + plain_saved)
        if got is None:
            return None
        choice, cost = got
        chosen = {u.name: opts[i][k] for i, (u, k) in enumerate(zip(self.table.units, choice, strict=True))}
        extra = sum(option_seconds(u, chosen[u.name], self.profile) for u in self.table.units) / self.t0
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
    found.sort(key=lambda f: f[0])
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
    raise _not_fit(planner, request, lambda c: _exact(model, c, request, profile, num_classes), profile.name)


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
    return out


def _finish(doc: Plan, chosen: Choices, est: Estimate, factor: float, rows: list[dict], reasons: list[str]) -> Plan:
    doc.choices = chosen
    doc.predicted, doc.overhead, doc.risk = est.predicted, round(factor, 4), _plan_risk(chosen)
    doc.candidates, doc.reasons = rows, reasons
    return doc


def _not_fit(planner: Planner, request: PlanRequest, exact, device: str) -> BudgetError:
    """The smallest peak reachable (everything at its most saving, finest micro-batches), and advice."""
    budget, batch_size, input_shape = request.budget_bytes, request.batch_size, request.input_shape
    g = step_wide_options(planner.profile, batch_size, planner.has_bn)[-1]
    least = {u.name: min(u.options, key=lambda o, u=u: planner._saved(o, u, g)) for u in planner.table.units}
    p = planner.to_choices(g, least)
    est = exact(p)
    peak = est.predicted.peak_device_bytes
    fixed = planner.table.fixed_bytes + planner.workspace  # weights, gradients, optimizer state, workspace
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
