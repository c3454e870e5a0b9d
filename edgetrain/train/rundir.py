"""A run directory: a new run goes into an empty one, `--resume` continues the run it holds as it
was started, a plan file must match the run, and `<parent>/last` points at the newest run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgetrain.errors import ConfigError
from edgetrain.planning import Plan

RUN_OPTIONS = ("device", "model", "data", "epochs", "batch_size", "input_size", "lr", "optimizer", "seed",
               "methods", "plan", "init", "prefer", "allow")  # fmt: skip
# what a plan must match (its device may differ: a plan made for a smaller budget is reused elsewhere)
PLAN_RECORDS = {"model": "model", "batch_size": "batch_size", "input_size": "input_shape", "optimizer": "optimizer"}


def check_resume_asks(saved: dict[str, Any], asked: dict[str, Any], out: Path) -> None:
    """`--resume` continues a run as it was started: an option that would change it is refused."""
    for key, value in asked.items():
        if key in RUN_OPTIONS and value is not None and value != saved.get(key) and value != []:
            flag = "--" + ("method" if key == "methods" else key.replace("_", "-"))
            raise ConfigError(
                f"--resume continues {out} as it was started ({flag} {_shown(saved.get(key))}); it cannot change "
                f"{flag} to {_shown(value)}: drop {flag}, or train further in a new run with --init {out}/model.pt"
            )


def _shown(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def check_new_run_dir(out: Path) -> None:
    """A new run goes into a new or empty directory; one holding a run is resumed, not overwritten,
    and one holding other files (the user's own plan.yaml, report.json) is left alone."""
    if out.joinpath("checkpoint.pt").exists():
        raise ConfigError(f"{out} already holds a run: use --resume {out} or another --out")
    if out.is_dir() and (files := sorted(p.name for p in out.iterdir())):
        raise ConfigError(f"--out {out} is not empty ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) "
                          "and holds no run: give a new or empty directory")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a directory")


def check_plan_file(cfg: Any) -> None:
    """A plan is made for one model, batch, input size and optimizer: refuse another."""
    if not cfg.plan:
        return
    plan = Plan.load(cfg.plan)
    for key, field_ in PLAN_RECORDS.items():
        recorded = getattr(plan.request, field_)
        recorded = recorded[-1] if field_ == "input_shape" else recorded
        if recorded is not None and recorded != getattr(cfg, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"plan {cfg.plan} was made for {flag} {recorded}, this run has {getattr(cfg, key)}: train with "
                f"the plan's ({flag} {recorded}), or make a plan for this run with `edgetrain plan`"
            )


def point_last_at(run: Path) -> None:
    """`<parent>/last` -> this run (replaced atomically), so `--resume runs/last` finds it."""
    last = run.parent / "last"
    if run.name == "last" or (last.exists() and not last.is_symlink()):
        return
    tmp = run.parent / ".last.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, last)
