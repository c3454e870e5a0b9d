"""`fit`: the training recipe — setup, train, save_checkpoint, cleanup — in one readable class.

Plan (or load the given plan), apply it, train under the device's budget (the budget guard
watches the first steps after every (re)plan, so a CPU host behaves like the device), evaluate
every epoch, checkpoint atomically every `ckpt_every` steps and at epoch ends, and write
metrics, report.json and plots. SIGINT/SIGTERM checkpoint before exiting; `--resume` continues
bit-for-bit on a CPU (model, optimizer, scheduler, RNG, data order and position).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetrain.core.step import make_optimizer, make_schedule, train_step
from edgetrain.errors import BudgetError, ConfigError, EdgeOOMError, EdgetrainError
from edgetrain.levels import DEFAULT_ALLOW, check_allow
from edgetrain.memory.guard import BudgetGuard, allocation_granularity, tensor_budget
from edgetrain.memory.predict import check_input_size
from edgetrain.methods.base import UnusedMethod, spec_of, structural_specs, unused_methods
from edgetrain.methods.lowrank import conversion_report, resize_to_
from edgetrain.models import create_model
from edgetrain.planning import Choices, Plan, PlanRequest, apply_plan_, plan_for
from edgetrain.progress import Progress
from edgetrain.train import checkpoint as ckpt
from edgetrain.train import distributed as ddp
from edgetrain.train.calibrate import resolve_profile
from edgetrain.train.data import augment, load_data
from edgetrain.train.evaluate import Evaluation, precise_bn_sample, recalibrate_bn_
from edgetrain.train.evaluate import evaluate as evaluate_model
from edgetrain.train.pressure import KEEP_FREE, Replanning, replan
from edgetrain.train.rundir import check_new_run_dir, check_plan_file, check_resume_asks, point_last_at

PER_INVOCATION = ("out", "quiet", "max_steps", "memory_source", "keep_free")  # a resumed run takes these anew
GUARDED_STEPS = 2  # steps watched by the budget guard after each (re)plan
MAX_RECOVERIES = 3  # divergences a run recovers from (back to the last checkpoint, lr halved)


@dataclass
class FitConfig:
    device: str = "gtx750-1gb"
    model: str = "cifar_resnet20"
    data: str = "digits"
    epochs: int = 8
    batch_size: int = 64
    input_size: int = 32
    lr: float | None = None  # None: `default_lr` for the optimizer and batch
    optimizer: str = "sgd"
    seed: int = 0
    out: str = ""  # run directory; empty: runs/<date-time>, with runs/last pointing at it
    methods: list[str] = field(default_factory=list)  # forced methods; empty: planned
    plan: str | None = None  # a plan file (from an earlier run's plan.yaml) instead of planning
    init: str | None = None  # weights to start from (an earlier run's model.pt): low-rank methods convert them
    prefer: str = "speed"  # the planner's objective: speed or accuracy
    allow: str = DEFAULT_ALLOW  # how much the planner may change training: exact, lossy, architecture
    ckpt_every: int = 20  # steps between checkpoints (and at every epoch end)
    max_steps: int = 0  # stop after this many steps (0: all epochs); for tests and smoke runs
    skip_unused: bool = False  # a forced method with no eligible layer is dropped (with a line), not refused
    memory_source: str = "auto"  # what is watched for memory pressure (memory/available.py SOURCES)
    keep_free: int = KEEP_FREE  # bytes left to the rest of the system while memory is watched
    quiet: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "input_size", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        check_allow(self.allow)
        if self.keep_free < 0:
            raise ConfigError(f"--keep-free must be a size of 0 or more, got {self.keep_free}")
        if self.lr is None:
            self.lr = default_lr(self.optimizer, self.batch_size)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")


class Interrupted(EdgetrainError):
    exit_code = 130


class Diverged(EdgetrainError):
    """The training loss went non-finite or jumped far above its running level."""

    exit_code = 4


class Recipe(Replanning):
    """One training run. `run()` = setup, train, cleanup; state lives in the run directory."""

    def __init__(self, cfg: FitConfig, resume: bool = False, asked: dict[str, Any] | None = None):
        """`asked`: the options the user gave with `resume` (they must match the run's)."""
        if not cfg.out:
            cfg.out = ddp.default_out()
        self.cfg, self.resume, self.asked = cfg, resume, asked or {}
        self.out = Path(cfg.out)
        self.stop_signal: int | None = None

    # --- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.profile = resolve_profile(cfg.device)
        self.world = ddp.world()
        self.dev = ddp.start(self.world, self.profile.kind != "cpu" and torch.cuda.is_available())
        state = ckpt.load(self.out / "checkpoint.pt") if self.resume else None
        if state is None:
            check_new_run_dir(self.out)
            check_plan_file(cfg)
        else:
            check_resume_asks(state["config"], self.asked, self.out)
            self.cfg = cfg = FitConfig(**{**state["config"], **{k: getattr(cfg, k) for k in PER_INVOCATION}})
        ddp.barrier(self.world)  # every rank has checked the directory before rank 0 writes to it
        _seed_everything(cfg.seed)
        self.data = load_data(cfg.data, cfg.input_size, cfg.seed)
        self.rank_batch = ddp.check_batch(cfg.batch_size, self.world)
        self.train_loader, self.test_loader = self.data.loaders(cfg.batch_size, cfg.seed, self.profile.kind)
        self._build_model(state)
        self.opt = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        total = cfg.epochs * len(self.train_loader)
        self.sched = make_schedule(self.opt, cfg.lr, total)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.step_in_epoch, self.step, self.history = 0, 0, 0, []
        self.epoch_gen_state = self.train_loader.generator.get_state()
        self.step_times: list[float] = []
        self.measured_peak = None
        self.recoveries = 0
        self.bn_sample = precise_bn_sample(self.data.train, cfg.seed)
        self.base_plan, self.replans, self.pressure_budget = self.plan, [], None
        self.watch = self._open_watch()
        if state is not None:
            self._restore(state)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.world.main:
            point_last_at(self.out)
            self.save_checkpoint()  # step 0: a divergence in the first steps has somewhere to go back to
            self.plan.save(self.out / "plan.yaml")  # after the checkpoint: the directory is a run now
        self._name_skipped()

    def _name_skipped(self) -> None:
        """Unreadable images: the first few named on stderr, all of them in skipped_images.txt."""
        bad = self.data.skipped
        if not bad or not self.world.main:
            return
        listing = self.out / "skipped_images.txt"
        listing.write_text("".join(f"{b}\n" for b in bad))
        print(f"edgetrain fit: skipped {len(bad)} unreadable image files in {self.cfg.data}: "
              f"{', '.join(b.name for b in bad[:3])}{', ...' if len(bad) > 3 else ''} (all listed in {listing})",
              file=sys.stderr)  # fmt: skip

    def _build_model(self, state: dict[str, Any] | None) -> None:
        """The model with its plan applied, on the device; a low-rank conversion is reported."""
        cfg = self.cfg
        self.model = create_model(cfg.model, len(self.data.classes), None if state else cfg.init)
        if state is None:
            check_input_size(self.model, cfg.input_size, cfg.model)
        self.plan = _state_plan(state, cfg.model) if state else self._plan(cfg.methods)
        dense = (
            copy.deepcopy(self.model)
            if state is None and any(c.structural for c in self.plan.choices.methods)
            else None
        )
        self._apply(self.plan)
        if state is not None:
            resize_to_(self.model, state["model"])  # ranks chosen from the weights (energy): the checkpoint's
        self.conversion = conversion_report(dense, self.model, self._sample()) if dense is not None else None
        if self.conversion and not cfg.quiet:
            c = self.conversion
            print(f"edgetrain fit: {len(c['layers'])} layers factorized ({spec_of(self.plan.choices.methods[0])}): logits error "
                  f"{c['logits_error']:.3f}, top-1 agreement {c['top1_agreement']:.1%} with the dense model")  # fmt: skip
        self.model.to(self.dev)
        ddp.check_methods([*self.plan.choices.methods, *self.plan.choices.layers.values()], self.world)
        self.net = ddp.wrap(self.model, self.world, self.dev)  # what steps run through (the model itself elsewhere)

    def _plan(self, forced: list[str]) -> Plan:
        """The run's first plan: the --plan file, the forced methods, or the planner's for the device
        (mid-run changes of plan: train/pressure.py)."""
        cfg = self.cfg
        if cfg.plan:
            return Plan.load(cfg.plan)
        forced = self._usable(forced)
        low = structural_specs(forced)
        if len(low) < len(forced):
            request = PlanRequest(cfg.model, self.data.input_shape, self.rank_batch, cfg.optimizer, self.profile.name,
                                  processes=self.world.size)  # fmt: skip
            return Plan(request, Choices(list(forced)))
        return plan_for(self.model, self.data.input_shape, self.rank_batch, self.profile, cfg.optimizer, cfg.prefer,
                        cfg.model, len(self.data.classes), methods=low, allow=cfg.allow, processes=self.world.size)  # fmt: skip

    def _usable(self, forced: list[str]) -> list[str]:
        """The forced methods that change something in this model; one that finds no eligible
        layer is refused, or dropped with a line when `skip_unused`."""
        unused = [UnusedMethod(s, self.cfg.model) for s in unused_methods(self.model, forced)]
        if unused and not self.cfg.skip_unused:
            raise unused[0]
        for err in unused:
            print(f"edgetrain fit: {err.skipped_line()}", file=sys.stderr)
        return [s for s in forced if s not in {e.spec for e in unused}]

    def _apply(self, plan: Plan) -> None:
        if self.cfg.init is None:  # from scratch: layers the planner factorized start from fresh factors
            c = plan.choices  # (decomposing random weights gives nothing, and takes minutes on vgg's 25088x4096)
            layers = {n: k.from_scratch() for n, k in c.layers.items()}
            plan = dataclasses.replace(plan, choices=Choices(c.methods, layers, c.shapes))
        self._settle(apply_plan_(self.model, plan))

    def _settle(self, settings) -> None:
        """Take a plan's step settings; the next steps run under the budget guard."""
        self.settings = settings
        self.scaler = torch.amp.GradScaler(self.dev.type) if settings.precision == "fp16" else None
        # on the device itself real OOMs guard the run; elsewhere the guard plays the device
        self.guarded = GUARDED_STEPS if self.dev.type == "cpu" else 0

    # --- train -----------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        quiet = cfg.quiet or not self.world.main
        with Progress(cfg.epochs * len(self.train_loader), self.profile.usable_memory_bytes, quiet=quiet) as bar:
            bar.advance_to(self.step)
            while self.epoch < cfg.epochs:
                try:
                    self._train_epoch(bar)
                except Diverged as e:
                    self._recover(e, bar)
                    continue
                if self.stop_signal is not None or self._done():
                    return
                self.epoch += 1
                self.step_in_epoch = 0
                self.epoch_gen_state = self.train_loader.generator.get_state()
                self._plan_up(bar)
                self.save_checkpoint()

    def _train_epoch(self, bar: Progress) -> None:
        self.train_loader.generator.set_state(self.epoch_gen_state)
        for i, (x, y) in enumerate(self.train_loader):
            if i < self.step_in_epoch:
                continue  # resumed mid-epoch: same order, skip what was done
            x = augment(x, self.aug_gen, flip=self.cfg.data != "digits")  # the whole batch: every rank draws alike
            self._watch_memory(bar)
            loss = self._step(ddp.shard(x, self.world).to(self.dev, non_blocking=True),
                              ddp.shard(y, self.world).to(self.dev, non_blocking=True))  # fmt: skip
            self._check_divergence(loss)
            self.step_in_epoch, self.step = i + 1, self.step + 1
            self.history.append(
                {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": self.sched.get_last_lr()[0]}
            )
            bar.update(self.step, loss, self.measured_peak)
            if self.step % self.cfg.ckpt_every == 0 or self.stop_signal is not None or self._done():
                self.save_checkpoint()
            if self.stop_signal is not None or self._done():
                return
        ev = self.evaluate()
        self.history.append(
            {"step": self.step, "epoch": self.epoch, "test_accuracy": ev.accuracy, "test_loss": ev.loss}
        )
        bar.note(f"epoch {self.epoch + 1}/{self.cfg.epochs}: test accuracy {ev.accuracy:.2%}, loss {ev.loss:.3f}")

    def _check_divergence(self, loss: float) -> None:
        """Non-finite, or above chance level (ln K) and 4x the median of the last 20 losses."""
        recent = [h["loss"] for h in self.history[-20:] if "loss" in h]
        chance = math.log(max(2, len(self.data.classes)))
        if not math.isfinite(loss) or (len(recent) >= 5 and loss > chance and loss > 4 * statistics.median(recent)):
            raise Diverged(f"training loss {loss:.4g} at step {self.step + 1}")

    def _recover(self, err: Diverged, bar: Progress) -> None:
        """Back to the last checkpoint with the learning rate halved; say so in one line."""
        self.recoveries += 1
        if self.recoveries > MAX_RECOVERIES:
            raise Diverged(f"{err} after {MAX_RECOVERIES} recoveries with the learning rate halved each time: "
                           f"start again with a lower --lr (now {self.cfg.lr:g})") from None  # fmt: skip
        recoveries, peak, replans, pressure = self.recoveries, self.measured_peak, self.replans, self.pressure_budget
        self._restore(ckpt.load(self.out / "checkpoint.pt"))  # weights and state; the plan now active stays
        self.recoveries, self.replans, self.pressure_budget = recoveries, replans, pressure
        self.measured_peak = self.measured_peak or peak  # a checkpoint from before the guarded steps has none
        self.cfg.lr /= 2
        for g in self.opt.param_groups:  # OneCycleLR reads its schedule from these
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in g:
                    g[key] /= 2
        bar.advance_to(self.step)
        bar.note(f"edgetrain fit: diverged ({err}); back to step {self.step}, learning rate halved to "
                 f"{self.cfg.lr:g}, going on", always=True)  # fmt: skip
        self.save_checkpoint()  # a second divergence halves from here, not from the old rate

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        buffers = [b.clone() for b in self.model.buffers()] if self.guarded else None
        try:
            if self.guarded:
                with BudgetGuard(
                    self._tensor_budget(), self.model, self.opt, (x, y), allocation_granularity(self.profile)
                ) as g:
                    loss = train_step(self.net, x, y, self.opt, self.settings, g, self.scaler)
                self.measured_peak = g.report().peak_bytes
                self.guarded -= 1
            else:
                loss = train_step(self.net, x, y, self.opt, self.settings, scaler=self.scaler)
                if self.dev.type == "cuda":
                    self.measured_peak = torch.cuda.max_memory_allocated()
        except (EdgeOOMError, torch.OutOfMemoryError) as e:
            for b, saved in zip(self.model.buffers(), buffers or [], strict=False):
                b.copy_(saved)  # the failed step's BatchNorm statistics do not count
            self._replan(e)
            return self._step(x, y)
        self.sched.step()
        self.step_times.append(time.perf_counter() - t0)
        return float(ddp.mean_over_ranks(loss, self.world))  # every rank sees the batch's loss, and acts alike

    def _sample(self) -> torch.Tensor:
        """A fixed batch of test inputs (the conversion report's sample)."""
        x, _ = next(iter(self.test_loader))
        return x[:32]

    def _tensor_budget(self) -> int:
        """The device's, or less while memory pressure holds the run to a smaller budget."""
        b = tensor_budget(self.profile)
        return b if self.pressure_budget is None else min(b, self.pressure_budget - self.profile.workspace_bytes)

    def _replan(self, err: Exception) -> None:
        """Out of memory: plan again for 80% of the budget, apply, retry the same batch."""
        if self.world.size > 1:  # one rank's new plan would leave the others waiting in a collective
            raise EdgeOOMError(f"{err}; with --nproc, plan for the device first (`edgetrain plan`) and pass --plan")
        self.opt.zero_grad(set_to_none=True)
        tighter = int(self._tensor_budget() * 0.8)
        try:
            new = replan(self, tighter)
        except BudgetError:
            raise err from None
        if new.summary() == self.plan.summary():
            raise err
        self._switch(new, f"out of memory ({err}); re-planned for {tighter / 2**20:.0f} MiB", tighter)
        self.base_plan = new  # the first plan did not fit: memory coming back does not bring it back

    def evaluate(self) -> Evaluation:
        """Test figures with BatchNorm statistics re-estimated for the current weights."""
        recalibrate_bn_(self.model, self.bn_sample, self.cfg.batch_size, self.dev)
        return evaluate_model(self.model, self.test_loader, len(self.data.classes), self.dev)

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Rank 0 writes (atomically); the other ranks hold the same state and write nothing."""
        if not self.world.main:
            return self.out / "checkpoint.pt"
        state = {
            "config": asdict(self.cfg), "plan": self.plan.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "step": self.step, "history": self.history,
            "epoch_gen_state": self.epoch_gen_state, "aug_gen_state": self.aug_gen.get_state(),
            "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
            "classes": self.data.classes, "input_shape": self.data.input_shape, "recoveries": self.recoveries,
            "measured_peak": self.measured_peak, "step_times": self.step_times,
            "base_plan": self.base_plan.to_dict(), "replans": self.replans, "pressure_budget": self.pressure_budget,
            "memory_log": self.watch.log if self.watch else [],
        }  # fmt: skip
        return ckpt.save(state, self.out / "checkpoint.pt")

    def _restore(self, state: dict[str, Any]) -> None:
        if len(state["classes"]) != len(self.data.classes):
            raise ConfigError(f"the checkpoint has {len(state['classes'])} classes but the data has "
                              f"{len(self.data.classes)}: resume with the same --data")  # fmt: skip
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        self.history, self.epoch_gen_state = state["history"], state["epoch_gen_state"]
        self.recoveries = state.get("recoveries", 0)
        self.measured_peak, self.step_times = state.get("measured_peak"), state.get("step_times", [])
        self.base_plan = Plan.from_dict(state["base_plan"], "checkpoint") if "base_plan" in state else self.plan
        self.replans, self.pressure_budget = state.get("replans", []), state.get("pressure_budget")
        if self.watch is not None:
            self.watch.log = state.get("memory_log", [])
        self.aug_gen.set_state(state["aug_gen_state"])
        torch.set_rng_state(state["rng"][0])
        np.random.set_state(state["rng"][1])
        random.setstate(state["rng"][2])

    # --- run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.setup()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.train()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.stop_signal is not None:
                ddp.stop()
        if self.stop_signal is not None:
            raise Interrupted(
                f"stopped by signal {self.stop_signal}; checkpoint saved: resume with --resume {self.out}"
            )
        return self.cleanup()

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def cleanup(self) -> dict[str, Any]:
        from edgetrain.train.report import write_report

        ev = self.evaluate()  # BatchNorm statistics re-estimated: what is saved is what is evaluated
        if not self.world.main:
            ddp.stop()
            return {"rank": self.world.rank, "test_accuracy": ev.accuracy}
        ckpt.save_weights(self.model.state_dict(), self.out / "model.pt")
        report = write_report(self, ev)
        ddp.stop()
        return report


def fit(
    cfg: FitConfig | None = None, resume: bool = False, asked: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Plan, apply and train; returns the report (also written to `<out>/report.json`). With
    `resume`, `asked` holds options the caller gave: each must match the run's own."""
    return Recipe(cfg or FitConfig(**kwargs), resume=resume, asked=asked).run()


def default_lr(optimizer: str, batch_size: int) -> float:
    """Peak learning rate of the one-cycle schedule: SGD 0.1 per 256 images (the linear scaling
    rule of Goyal et al. 2017), AdamW 1e-3. Measured on the sample photos (bench/recipe.py),
    0.05 at batch 64 spiked and ended 3 points lower."""
    return 0.1 * batch_size / 256 if optimizer == "sgd" else 1e-3


def _state_plan(state: dict[str, Any], model: str) -> Plan:
    """The plan a checkpoint was trained with (checkpoints before plan version 2 kept a methods list)."""
    if "plan" in state:
        return Plan.from_dict(state["plan"], "checkpoint")
    return Plan(PlanRequest(model), Choices([str(m) for m in state.get("methods", [])]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def median_step_time(times: list[float]) -> float | None:
    return statistics.median(times[2:] or times) if times else None
