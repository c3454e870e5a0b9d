"""`plan_for()`: the configuration that fits the device at the least cost.

The planner (planner.py) reads the methods through the handler protocol (methods/base.py) and
names none of them. Step-wide settings are tried cheapest first; the chosen one's plan is
verified with an exact fake-tensor estimate, and if the estimate says it does not fit, the
knapsack is solved again with the overshoot taken off. Nothing fits at the `allow` level: the
levels above are tried, and the answer says which one would do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.devices.profile import DeviceProfile
from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.levels import CHANGE_LEVELS, DEFAULT_ALLOW, check_allow
from edgetrain.memory.allocator import MiB
from edgetrain.memory.measure import shell_copy
from edgetrain.memory.predict import num_classes_of
from edgetrain.methods.base import (
    LAYER_CHANGE_RISK,
    METHODS,
    MethodConfig,
    as_config,
    change_level,
    list_methods,
    prepare,
    spec_of,
)  # fmt: skip
from edgetrain.planning.estimate import Estimate, estimate
from edgetrain.planning.frontier import frontier
from edgetrain.planning.planner import PREFER, Planner, StepWide
from edgetrain.planning.record import Choices, Plan, PlanRequest, apply_plan_
from edgetrain.planning.units import option_seconds


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
    allow: str = DEFAULT_ALLOW,
    frontier: bool = False,
    processes: int = 1,
) -> Plan:
    """The least-cost plan whose predicted device peak fits `device` (or `budget_bytes`).

    Plain when the model fits as it is; `BudgetError` with the smallest reachable peak and what
    would make it fit when nothing does. `methods`: structural methods (low-rank layers) the user
    chose; they are applied first and the search plans the factorized model. `allow`: exact,
    lossy (the default) or architecture, how much the plan may change the training. `frontier`:
    also sweep the memory/time trade-off (`Plan.frontier`). `processes`: DDP ranks, each running
    this step at `batch_size` (only methods DDP can follow)."""
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
                          budget_bytes or profile.usable_memory_bytes, prefer, check_allow(allow), processes)  # fmt: skip
    chosen = _search(model, request, profile, num_classes, base, frontier)
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


def _search(
    model: nn.Module, request: PlanRequest, profile: DeviceProfile, num_classes: int | None, base: str, sweep: bool
) -> Plan:
    """The search on `model` as given; `base` names it (plain, or the low-rank methods applied);
    `sweep`: also the memory/time frontier."""
    budget = request.budget_bytes

    def exact(c: Choices) -> Estimate:
        return estimate_plan(model, c, request, profile, num_classes)

    plain = exact(Choices())
    doc = Plan(request)
    spec = StepSpec(request.input_shape, request.batch_size, num_classes or num_classes_of(model), request.optimizer)
    planner = Planner(model, spec, profile, request.prefer, plain, request.allow, request.processes) if sweep else None
    if planner is not None:
        doc.frontier = frontier(planner)
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
    planner = planner or Planner(model, spec, profile, request.prefer, plain, request.allow, request.processes)
    rows = [row]
    passes = _passes(planner, request.allow)
    for level, cap in passes:  # the layers change only when nothing fits without that
        planner.allow, planner.max_risk = level, cap
        got = _first_fit(planner, budget, exact, rows)
        if got is not None:
            cand, est, factor, g = got
            return _finish(doc, cand, est, factor, rows, _reasons(planner, g, cand, est, budget, base))
        if (level, cap) != passes[-1] and not _near(planner, budget):
            continue  # far from fitting as modelled: the next pass is searched without an exact check
        g, p, est = _cheapest_lightest(planner, budget, exact)
        if est.predicted.peak_device_bytes <= budget:  # the linear model erred high; the exact check says it fits
            factor = planner.global_cost(g)[1]
            rows.append({**_row(p, est, factor, True), "chosen": True})
            why = "the modelled plans did not fit; the lightest plan of this setting, estimated exactly, does"
            return _finish(doc, p, est, factor, rows, [why, *_reasons(planner, g, p, est, budget, base)])
    raise _not_fit(planner, request, g, p, est, _at_a_higher_level(planner, budget, exact))


NEAR = 1.15  # the model errs by a few % (the device level: segments, fragmentation): beyond this, it does not fit


def _near(planner: Planner, budget: int, g: StepWide | None = None) -> bool:
    """Whether the lightest plan as modelled (under setting `g`, or any) comes within NEAR of `budget`:
    worth an exact check."""
    least = planner.least_peak(g) if g is not None else min(planner.least_peak(s) for s in planner.settings())
    return planner.device_bytes(least) <= budget * NEAR


def _passes(planner: Planner, allow: str) -> list[tuple[str, int | None]]:
    """The (level, risk cap) passes to search in turn: the level allowed, or, when that is the
    architecture, first the one below (exact and lossy levers are weighed together: their cost
    decides), then the layers' changes, and only when those do not fit either, the levers that risk
    more than a change of the layers (micro-batches of one image under BatchNorm: -21 points on
    digits, against about 2 for low-rank layers). A pass that adds no setting is left out."""
    top = CHANGE_LEVELS[-1]
    if allow != top:
        return [(allow, None)]
    passes = [(CHANGE_LEVELS[-2], None), (top, LAYER_CHANGE_RISK)]
    saved = planner.allow, planner.max_risk
    planner.allow, planner.max_risk = top, LAYER_CHANGE_RISK
    capped = len(planner.settings())
    planner.max_risk = None
    more = len(planner.settings()) > capped
    planner.allow, planner.max_risk = saved
    return passes + [(top, None)] if more else passes


def _first_fit(
    planner: Planner, budget: int, exact, rows: list[dict]
) -> tuple[Choices, Estimate, float, StepWide] | None:
    """The cheapest step-wide setting whose plan fits in the exact check; `rows` get the table. A
    cheaper setting the linear model put just over the budget has its lightest plan checked too."""
    found, missed = [], []
    for g in planner.settings():
        got = planner.solve(g, budget)
        if got is None:
            rows.append({"plan": g.label() + " (nothing fits)", "fits": False})
            if _near(planner, budget, g):
                missed.append((planner.global_cost(g)[0], g))
            continue
        found.append((got[1], g, got))
    found = _undominated(found)
    missed = _adds_something(planner, sorted(missed, key=lambda m: m[0]))[:TRIES]
    for i, (cost, g, got) in enumerate(found):
        for g0 in [g0 for c0, g0 in missed if c0 < cost]:
            missed = [m for m in missed if m[1] != g0]
            _, p0, est0 = _lightest(planner, exact, g0)
            if est0.predicted.peak_device_bytes <= budget:
                factor0 = planner.global_cost(g0)[1]
                rows.append({**_row(p0, est0, factor0, True), "chosen": True})
                return p0, est0, factor0, g0
        verified = _verify(planner, g, got, budget, exact)
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
        return cand, est, factor, g
    return None


def _at_a_higher_level(planner: Planner, budget: int, exact) -> tuple[str, Choices, Estimate] | None:
    """The first change level above the one allowed at which a plan fits, with that plan."""
    for level in CHANGE_LEVELS[CHANGE_LEVELS.index(planner.allow) + 1 :]:
        up = planner.at(level)
        for cap in [cap for at, cap in _passes(up, level) if at == level]:
            up.allow, up.max_risk = level, cap
            got = _first_fit(up, budget, exact, [])
            if got is not None:
                return level, got[0], got[1]
    return None


def _undominated(found: list[tuple[float, StepWide, tuple]]) -> list[tuple[float, StepWide, tuple]]:
    """Step-wide settings by cost, less those that choose the same per-unit options as a setting made
    of some of their configs, at no less cost: a config that changes nothing modelled is dropped."""
    found = sorted(found, key=lambda f: f[0])
    keep: list[tuple[float, StepWide, tuple]] = []
    for f in found:
        if not any(set(k[1].configs) < set(f[1].configs) and k[2][0] == f[2][0] for k in keep):
            keep.append(f)
    return keep


def _adds_something(planner: Planner, missed: list[tuple[float, StepWide]]) -> list[tuple[float, StepWide]]:
    """Settings by cost, less those whose lightest plan is modelled as light as that of a setting made
    of some of their configs: the config on top changes nothing modelled (not worth an exact check)."""
    keep: list[tuple[float, StepWide]] = []
    for cost, g in missed:
        least = planner.least_peak(g)
        if not any(set(k.configs) < set(g.configs) and planner.least_peak(k) <= least for _, k in keep):
            keep.append((cost, g))
    return keep


# After an exact check over budget, the next solve aims this many overshoots lower: a lower plan recomputes
# more, and CUDA's fragmentation around a recompute is what the model misses (mobilenet_v2 on the GTX 750:
# 1.0 left plans 1-4 % over after one correction; at 2.0, 28 exact checks instead of 34 over seven slow
# grid cases, and cheaper plans: a cheaper setting is no longer given up after two small steps)
OVERSHOOT_GAIN = 2.0
VERIFY_TRIES = 5  # the linear model errs most where a peak moves into backward (recompute, ops' inner copies)


def _verify(planner: Planner, g: StepWide, got: tuple, budget: int, exact) -> tuple[Choices, Estimate, float] | None:
    """Exact estimate of the plan; on overshoot solve again with the overshoot taken off (VERIFY_TRIES),
    while that gives another plan."""
    target, last = budget, None
    for _ in range(VERIFY_TRIES):
        chosen, _, factor = got
        if chosen == last:  # solving lower gave the same plan: it goes no lower in this setting
            return None
        cand = planner.to_choices(g, chosen)
        est = exact(cand)
        peak = est.predicted.peak_device_bytes
        if peak <= budget:
            return cand, est, factor
        last, target = chosen, target - OVERSHOOT_GAIN * (peak - budget) - budget // 100
        got = planner.solve(g, target)
        if got is None:
            return None
    return None


def estimate_plan(
    model: nn.Module, plan: Plan | Choices, request: PlanRequest, profile: DeviceProfile, num_classes: int | None = None
) -> Estimate:
    """`estimate` of a model with a plan's choices applied, for the step `request` names (fake
    tensors, nothing allocated; layers changed with their cheap twins: no decomposition)."""
    choices = plan.choices if isinstance(plan, Plan) else plan
    m = shell_copy(model)  # the plan changes layers and runs a fake step: no weight is copied
    apply_plan_(m, Choices([c for c in choices.methods if c.structural], choices.layers).for_shapes())
    rest = [c for c in choices.methods if not c.structural]
    r = request
    est = estimate(m, r.input_shape, r.batch_size, r.optimizer, profile, rest, num_classes, r.model, counts=False)
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
            parts = []
            if u.saved[o] or u.saved[None]:
                parts.append(f"keeps {planner._saved(o, u, g) / MiB:.1f} of {planner._saved(None, u, g) / MiB:.1f} MiB "
                             f"of activations for +{cost:.1%} time")  # fmt: skip
            if u.fixed[o] != u.fixed[None]:
                parts.append(f"its weights, gradients and optimizer state take {g.fixed(u.fixed[o]) / MiB:.1f} of "
                             f"{g.fixed(u.fixed[None]) / MiB:.1f} MiB")  # fmt: skip
            level = change_level(o)
            risk = (
                ""
                if level == "exact"
                else f" ({'changes the layers' if level == 'architecture' else 'lossy'}, risk {o.risk})"
            )
            out.append(f"{u.name}: {spec_of(o)}{risk} " + "; ".join(parts))
    return out


def _finish(doc: Plan, chosen: Choices, est: Estimate, factor: float, rows: list[dict], reasons: list[str]) -> Plan:
    if doc.frontier:  # the chosen plan at its exact peak (on the front or not, as modelled)
        label = "plain" if chosen.is_plain else chosen.summary()
        mine = {"plan": label, "time_factor": round(factor, 4), "risk": _plan_risk(chosen), "front": False}
        mine.update(next((r for r in doc.frontier if r["plan"] == label), {}))
        mine.update(peak_device_bytes=est.predicted.peak_device_bytes, chosen=True)
        doc.frontier = [r for r in doc.frontier if r["plan"] != label] + [mine]
    doc.choices = chosen
    doc.predicted, doc.overhead, doc.risk = est.predicted, round(factor, 4), _plan_risk(chosen)
    doc.candidates, doc.reasons = rows, reasons
    return doc


TRIES = 3  # exact checks of the cheapest settings' lightest plans near the budget, then of the lightest settings'


def _cheapest_lightest(planner: Planner, budget: int, exact) -> tuple[StepWide, Choices, Estimate]:
    """When the modelled plans do not fit: each setting's lightest plan estimated exactly, first the
    cheapest settings whose modelled least peak comes near the budget (an exact lever before a lossy
    one), then the settings lightest as modelled; the first that fits, else the lowest found (the
    linear model ranks the lightest plans only roughly: their transients are not in it)."""
    near = [g for g in planner.settings() if _near(planner, budget, g)]
    cheapest = sorted(near, key=lambda g: planner.global_cost(g)[0])[:TRIES]
    lightest = sorted(planner.settings(), key=planner.least_peak)[:TRIES]
    tried = []
    for g in dict.fromkeys(cheapest + lightest):
        tried.append(_lightest(planner, exact, g))
        if tried[-1][2].predicted.peak_device_bytes <= budget:
            return tried[-1]
    return min(tried, key=lambda t: t[2].predicted.peak_device_bytes)


def _lightest(planner: Planner, exact, g: StepWide | None = None) -> tuple[StepWide, Choices, Estimate]:
    """The plan with the least modelled peak (every unit at its lightest under the step-wide setting
    `g`, or the lightest setting allowed), estimated exactly."""
    g = g or min(planner.settings(), key=planner.least_peak)
    picks = [_lightest_choice(group) for group in planner.groups(g)]
    p = planner.to_choices(g, {k: v for what, _, _ in picks for k, v in what.items()})
    return g, p, exact(p)


def _lightest_choice(group: list[tuple[dict, int, float]], grain: int = 2**16) -> tuple[dict, int, float]:
    """The cheapest of a unit's choices within `grain` bytes of its lightest (they hold the same)."""
    least = min(b for _, b, _ in group)
    return min((e for e in group if e[1] <= least + grain), key=lambda e: e[2])


def _not_fit(planner: Planner, request: PlanRequest, g: StepWide, p: Choices, est: Estimate, higher) -> BudgetError:
    """The smallest peak reachable at the level allowed (the lightest plan's), and what would fit:
    a higher `--allow` level's plan, a batch or input size, or a smaller model."""
    budget, batch_size, input_shape = request.budget_bytes, request.batch_size, request.input_shape
    peak, device = est.predicted.peak_device_bytes, planner.profile.name
    at = "" if higher is None else f" with --allow {planner.allow}"  # a higher level would not help either
    head = (f"nothing fits {device}{at}: the smallest peak reachable is {peak / MiB:.0f} MiB ({p.summary()}) "
            f"against a budget of {budget / MiB:.0f} MiB")  # fmt: skip
    if higher is not None:
        level, hp, hest = higher
        return BudgetError(f"{head}; fits with --allow {level}: {hp.summary()}, "
                           f"{hest.predicted.peak_device_bytes / MiB:.0f} MiB predicted")  # fmt: skip
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
    return BudgetError(f"{head}: {advice}")
