"""Memory pressure during `fit`: a plan that fits is not killed when other processes take memory.

Before every step the run reads what is really available (`memory.available`) and works out what
the next step may reach: what it holds already (on a host, its resting tensors and the freed
memory its allocator kept, which the step reuses; on a GPU, the caching allocator's reserve),
plus what is available, less `keep_free` for the rest of the system, and never more than the
profile's budget. When the active plan's predicted device
peak is over that, it re-plans before the step, says so in one line, and goes on: no step is
lost. At an epoch end, when memory has come back, the run's first plan returns. When no plan can
meet what is left, the run saves a checkpoint and stops with one line (`MemoryGone`); `--resume`
goes on when memory is back.

A change of plan rebuilds the model: a fresh model gets the plan's layers (low-rank ones kept as
they are: a re-plan never changes layers mid-run), takes over the very weight and optimizer-state
tensors (no copy), and then gets the plan's other methods, so that the old ones come off cleanly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from edgetrain.core.step import StepSettings, make_optimizer, make_schedule
from edgetrain.errors import BudgetError, EdgetrainError
from edgetrain.levels import CHANGE_LEVELS
from edgetrain.memory.available import MemorySource, SourceUnreadable, named_source, open_source
from edgetrain.memory.guard import resting_bytes
from edgetrain.methods.base import step_settings_for
from edgetrain.methods.lowrank import resize_to_
from edgetrain.models import create_model
from edgetrain.planning import Choices, Plan, PlanRequest, apply_plan_, estimate_plan, plan_for
from edgetrain.progress import Progress

MiB = 2**20
KEEP_FREE = 128 * MiB  # left to the rest of the system by default: the kernel, a shell, a logger
HEADROOM = 0.9  # a pressure re-plan aims this far under what is left, so that noise does not re-plan again
LOG_LIMIT = 4096  # readings kept (thinned beyond)
RE_PLAN_LEVEL = "lossy"  # mid-run the layers stay: the optimizer holds their tensors


class MemoryGone(EdgetrainError):
    """Available memory fell below what any plan can meet; a checkpoint was saved."""

    exit_code = 7


@dataclass(frozen=True)
class Reading:
    """One look at memory before a step (bytes; the budget and peak at the device level)."""

    step: int
    available_bytes: int
    held_bytes: int
    budget_bytes: int  # what the next step may reach: min(profile budget, held + available - keep_free)
    plan_peak_bytes: int | None  # the active plan's predicted device peak (None: not needed, not known)
    plan: str


class PressureWatch:
    """Reads `source` and turns it into the budget the next step has."""

    def __init__(self, source: MemorySource, profile_budget: int, keep_free: int, on_gpu: bool,
                 warn: Callable[[str], None]):  # fmt: skip
        self.source, self.profile_budget, self.keep_free = source, profile_budget, keep_free
        self.on_gpu, self.warn = on_gpu, warn
        self.base: int | None = None  # RSS that is not tensors (framework, data), at the first reading
        self.log: list[dict[str, Any]] = []  # every reading, for report.json and the run's memory plot
        self._process = psutil.Process()

    def read(
        self,
        step: int,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        plan: Plan,
        peak: Callable[[bool], int | None],
    ) -> Reading | None:
        """This step's reading, or None when no source can be read any more (said once). `peak(must)`:
        the plan's predicted peak; estimated only when the budget is under the profile's (`must`)."""
        try:
            available = self.source.read()
        except SourceUnreadable as e:
            if not self._fall_back(e):
                return None
            available = self.source.read()
        held = torch.cuda.memory_reserved() if self.on_gpu else self._held_on_host(model, opt)
        budget = min(self.profile_budget, held + available - self.keep_free)
        r = Reading(step, available, held, budget, peak(budget < self.profile_budget), plan.summary())
        self.log.append(asdict(r))
        if len(self.log) > LOG_LIMIT:  # a long run keeps every other reading: checkpoints stay small
            self.log = self.log[::2]
        return r

    def _held_on_host(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
        """What the next step can reuse without asking for more: its resting tensors, and freed memory
        the allocator kept (RSS above what is not tensors, as first read: framework, data, Python)."""
        rest, rss = resting_bytes(model, opt), self._process.memory_info().rss
        if self.base is None:
            self.base = rss - rest
        return max(rest, rss - self.base)

    def _fall_back(self, err: SourceUnreadable) -> bool:
        """The source stopped answering mid-run: the next one of its kind (NVML -> torch's
        mem_get_info; a file or the cgroup -> MemAvailable), or nothing, said in one line."""
        host = self.source.level == "host" and self.source.name != "meminfo"
        nxt = {"nvml": "cuda"}.get(self.source.name, "meminfo" if host else None)
        if nxt is not None:
            fallback = named_source(nxt)
            try:
                fallback.read()
                self.warn(f"edgetrain fit: {self.source.name} stopped answering ({err}): watching {nxt} instead")
                self.source = fallback
                return True
            except SourceUnreadable:
                pass
        self.warn(f"edgetrain fit: {self.source.name} stopped answering ({err}): memory pressure is no longer watched")
        self.source = None  # type: ignore[assignment]
        return False

    @property
    def active(self) -> bool:
        return self.source is not None


def keep_level(allow: str) -> str:
    """The level a mid-run re-plan may use: the run's own, but never other layers."""
    return min(allow, RE_PLAN_LEVEL, key=CHANGE_LEVELS.index)


def layers_of(plan: Plan) -> Choices:
    """The plan's layer changes (low-rank methods and per-layer structural configs), shapes only."""
    c = plan.choices
    return Choices([m for m in c.methods if m.structural], {n: k for n, k in c.layers.items() if k.structural},
                   c.shapes).for_shapes()  # fmt: skip


def replan(recipe: Any, budget: int) -> Plan:
    """A plan for `budget` that keeps the run's layers: planned on a fresh model with them applied,
    at most at the lossy level. `BudgetError` when nothing fits."""
    cfg, data = recipe.cfg, recipe.data
    skeleton = layers_of(recipe.plan)
    model = create_model(cfg.model, len(data.classes))
    apply_plan_(model, skeleton)
    found = plan_for(model, data.input_shape, recipe.rank_batch, recipe.profile, cfg.optimizer, cfg.prefer,
                     cfg.model, len(data.classes), budget, allow=keep_level(cfg.allow))  # fmt: skip
    c = found.choices
    found.choices = Choices(
        [*skeleton.methods, *c.methods], {**skeleton.layers, **c.layers}, {**skeleton.shapes, **c.shapes}
    )
    return found


def plan_peak(recipe: Any, plan: Plan, estimate: bool = True) -> int | None:
    """The plan's predicted device peak for the run's profile: from the plan, or estimated once
    (a fake step); None when unknown and not `estimate`."""
    same_step = plan.request.batch_size == recipe.rank_batch and plan.request.device == recipe.profile.name
    if plan.predicted is not None and same_step:
        return plan.predicted.peak_device_bytes
    if not estimate:
        return None
    cfg, data = recipe.cfg, recipe.data
    request = PlanRequest(cfg.model, data.input_shape, recipe.rank_batch, cfg.optimizer, recipe.profile.name)
    est = estimate_plan(create_model(cfg.model, len(data.classes)), plan, request, recipe.profile, len(data.classes))
    plan.predicted = est.predicted
    return est.predicted.peak_device_bytes


def switch_plan(recipe: Any, plan: Plan) -> StepSettings:
    """Rebuild `recipe.model` under `plan`, carrying its weights, optimizer state and schedule over
    (the same tensors: nothing is copied); returns the step settings."""
    cfg = recipe.cfg
    weights, opt_state, sched_state = recipe.model.state_dict(), recipe.opt.state_dict(), recipe.sched.state_dict()
    model = create_model(cfg.model, len(recipe.data.classes))
    apply_plan_(model, layers_of(plan))
    resize_to_(model, weights)  # ranks chosen from weights (energy): the run's
    model.load_state_dict(weights, assign=True)  # parameters become the run's own tensors
    c = plan.choices
    rest = Choices([m for m in c.methods if not m.structural], {n: k for n, k in c.layers.items() if not k.structural},
                   c.shapes)  # fmt: skip
    apply_plan_(model, rest)
    recipe.model = recipe.net = model.to(recipe.dev)
    recipe.opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    recipe.sched = make_schedule(recipe.opt, cfg.lr, sched_state["total_steps"])
    recipe.opt.load_state_dict(opt_state)  # after the schedule is made: its rates are the run's
    recipe.sched.load_state_dict(sched_state)
    recipe.plan = plan
    return step_settings_for(c.methods)


def smallest_line(err: BudgetError, reading: Reading, source: str, out: str) -> str:
    """The one line a run stops with when nothing fits what is left."""
    return (f"available memory fell to {reading.available_bytes / MiB:.0f} MiB ({source}), leaving "
            f"{reading.budget_bytes / MiB:.0f} MiB for training at step {reading.step}: {err}; checkpoint saved: "
            f"free memory, then continue with --resume {out}")  # fmt: skip


class Replanning:
    """The recipe's side of memory pressure and of a change of plan (mixed into `Recipe`, whose
    attributes it uses: cfg, profile, dev, world, model, opt, plan, base_plan, watch, replans)."""

    def _open_watch(self) -> PressureWatch | None:
        """What this run watches for memory pressure (None: off, or a run of several processes)."""
        on_gpu = self.dev.type == "cuda"
        source = open_source(self.cfg.memory_source, self.profile.kind, on_gpu, self._warn)
        if source is None or self.world.size > 1:  # one rank's new plan would leave the others waiting
            return None
        return PressureWatch(source, self.profile.usable_memory_bytes, self.cfg.keep_free, on_gpu, self._warn)

    def _warn(self, line: str) -> None:
        if self.world.main:
            print(line, file=sys.stderr, flush=True)

    def _watch_memory(self, bar: Progress) -> None:
        """Before a step: when the active plan would not fit what is left, re-plan first."""
        if self.watch is None or not self.watch.active:
            return
        r = self.watch.read(self.step, self.model, self.opt, self.plan, lambda must: plan_peak(self, self.plan, must))
        if r is None or r.plan_peak_bytes is None or r.plan_peak_bytes <= r.budget_bytes:
            return  # None: the budget is the profile's, which the plan was made for (the guard checks)
        peak = r.plan_peak_bytes
        target = int(r.budget_bytes * HEADROOM)
        try:
            new = replan(self, target)
            if new.summary() == self.plan.summary():
                raise BudgetError(f"the plan {new.summary()} is the smallest, at {peak / 2**20:.0f} MiB")
        except BudgetError as e:
            self.save_checkpoint()
            raise MemoryGone(smallest_line(e, r, self.watch.source.name, str(self.out))) from None
        self._switch(new, f"{self._available(r)}; re-planned for {target / 2**20:.0f} MiB before step {self.step + 1}",
                     target, bar)  # fmt: skip
        self.pressure_budget = target

    def _plan_up(self, bar: Progress) -> None:
        """At an epoch end, when memory has come back: the run's first plan again."""
        if self.watch is None or not self.watch.active or self.plan.summary() == self.base_plan.summary():
            return
        want = plan_peak(self, self.base_plan)
        r = self.watch.read(self.step, self.model, self.opt, self.plan, lambda must: plan_peak(self, self.plan, must))
        if r is None or want > r.budget_bytes * HEADROOM:
            return
        room = f"available memory {r.available_bytes / MiB:.0f} MiB ({self.watch.source.name})"
        self._switch(self.base_plan, f"{room}: room again for the first plan ({want / MiB:.0f} MiB); back to it at "
                     f"the end of epoch {self.epoch}", r.budget_bytes, bar)  # fmt: skip
        self.pressure_budget = None

    def _available(self, r: Reading) -> str:
        """Why the budget is what it is: what is available, or the device's own budget."""
        if r.budget_bytes >= self.watch.profile_budget:
            return f"the plan needs {r.plan_peak_bytes / MiB:.0f} MiB, over {self.profile.name}'s budget"
        return f"available memory {r.available_bytes / MiB:.0f} MiB ({self.watch.source.name})"

    def _switch(self, new: Plan, why: str, budget: int, bar: Progress | None = None) -> None:
        """Rebuild the model under `new` (weights and optimizer state carried over), record, say it."""
        old = self.plan.summary()
        self._settle(switch_plan(self, new))
        if self.world.main:
            new.save(self.out / "plan.yaml")
        self.replans.append({"step": self.step, "from": old, "to": new.summary(), "budget_bytes": budget,
                             "why": why})  # fmt: skip
        if self.watch is not None and self.watch.log:  # the reading before, with the plan now active
            self.watch.log.append(
                {**self.watch.log[-1], "plan_peak_bytes": plan_peak(self, new), "plan": new.summary()}
            )
        line = f"edgetrain fit: {why}: {old} -> {new.summary()}"
        bar.note(line, always=True) if bar else print(line, flush=True)
