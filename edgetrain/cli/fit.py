"""`edgetrain fit`: plan, apply and train on the device's budget; resumable."""

from __future__ import annotations

import argparse
import os
import sys

from edgetrain.cli.common import Verb, add_json, print_json
from edgetrain.levels import CHANGE_LEVELS


class Fit(Verb):
    name = "fit"
    help = "plan, apply and train (embedded digits data by default); checkpointed and resumable"
    examples = (
        "edgetrain fit --device gtx750-1gb",
        "edgetrain fit --device jetson-nano --model resnet18 --input-size 64 --batch-size 32 --epochs 3",
        "edgetrain fit --device cpu --data ./my-images --out runs/mine",
        "edgetrain fit --resume runs/mine",
        "edgetrain fit --device jetson-nano --plan runs/mine/plan.yaml --out runs/again",
        "edgetrain fit --method tucker2:ratio=0.25,reg=so --epochs 4   # low-rank from scratch, planned on top",
        "edgetrain fit --init runs/mine/model.pt --method tucker2:energy=0.9 --method partial --epochs 2",
        "edgetrain fit --device cpu --nproc 2 --batch-size 64 --out runs/ddp   # DDP: 2 processes of 32",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        # run options default to None here: FitConfig's defaults fill them, a --plan file's record
        # comes first, and --resume can tell what was asked from what was left out
        p.add_argument("--device", "-d", help="device profile to fit (see `edgetrain devices`; default gtx750-1gb)")
        p.add_argument("--model", "-m", help="model name (default cifar_resnet20)")
        p.add_argument("--data", help="'digits' (default), an ImageFolder directory, or CIFAR-10 batches")
        p.add_argument("--epochs", type=int, help="default 8")
        p.add_argument("--batch-size", "-b", type=int, help="default 64")
        p.add_argument("--input-size", "-s", type=int, help="default 32")
        p.add_argument("--lr", type=float, help="peak learning rate (default: sgd 0.1 x batch/256, adamw 1e-3)")
        p.add_argument("--optimizer", choices=("sgd", "adamw"), help="default sgd")
        p.add_argument("--seed", type=int)
        p.add_argument("--method", action="append", metavar="SPEC", help="force methods instead of planning")
        p.add_argument("--skip-unused", action="store_true",
                       help="drop a --method that finds no eligible layer (with a line) instead of refusing")  # fmt: skip
        p.add_argument("--prefer", choices=("speed", "accuracy"), help="the planner's objective (default speed)")
        p.add_argument("--allow", choices=CHANGE_LEVELS,
                       help="how much the plan may change training (default lossy; architecture: low-rank layers)")  # fmt: skip
        p.add_argument("--plan", metavar="YAML", help="use this plan file (e.g. an earlier run's plan.yaml); "
                       "model, batch, input size, optimizer and device come from it")  # fmt: skip
        p.add_argument("--init", metavar="PT", help="start from these weights (an earlier run's model.pt); "
                       "with tucker2/cp they are converted, and the errors reported")  # fmt: skip
        p.add_argument(
            "--out", default="", help="run directory (default runs/<date-time>; runs/last points at the newest)"
        )
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        p.add_argument("--ckpt-every", type=int, default=20, help="steps between checkpoints")
        p.add_argument("--memory-source", default="auto", metavar="SRC",
                       help="what is watched for memory pressure between steps: auto, meminfo (MemAvailable, within a "
                       "container's cgroup limit), cgroup, nvml, cuda, file:PATH (a size another program writes) or "
                       "off; when the next step would not fit, the run re-plans first")  # fmt: skip
        p.add_argument("--keep-free", default="128MiB", metavar="SIZE",
                       help="memory left to the rest of the system while it is watched (default 128MiB)")  # fmt: skip
        p.add_argument("--nproc", type=int, default=1, help="train in this many processes (DDP under torchrun; "
                       "--batch-size is the total, split evenly)")  # fmt: skip
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
            return _launch(args)
        from edgetrain.train.recipe import FitConfig, fit
        from edgetrain.train.rundir import RUN_OPTIONS

        asked = {k: getattr(args, "method" if k == "methods" else k) for k in RUN_OPTIONS}
        asked = {k: v for k, v in asked.items() if v is not None}
        given = {} if args.resume else {**_from_plan(args.plan), **asked}
        cfg = FitConfig(**given, out=args.resume or args.out, ckpt_every=args.ckpt_every,
                        skip_unused=args.skip_unused, quiet=args.json, memory_source=args.memory_source,
                        keep_free=_size(args.keep_free))  # fmt: skip
        report = fit(cfg, resume=bool(args.resume), asked=asked)
        if "rank" in report:  # a rank other than 0 under --nproc: rank 0 reports for the run
            return 0
        if args.json:
            print_json(report)
        else:
            print(summary_line(report, cfg.out))
        if not report["learned"]:
            print(f"edgetrain fit: did not learn: test accuracy {report['test_accuracy']:.1%} is near chance "
                  f"({report['chance_accuracy']:.1%}): try more --epochs (now {cfg.epochs}), a lower --lr "
                  f"(now {report['config']['lr']:g}), or check that the class folders of --data hold what their names say",
                  file=sys.stderr)  # fmt: skip
        return 0


def _launch(args: argparse.Namespace) -> int:
    """`fit --nproc N`: the same command in N ranks under torchrun, all with one run directory."""
    from edgetrain.errors import ConfigError
    from edgetrain.train import distributed as ddp

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    from edgetrain.methods.base import parse_spec

    world = ddp.World(0, args.nproc, 0)  # what the ranks will check, checked here: one line, not one a rank
    if not args.resume:
        ddp.check_batch(args.batch_size or _from_plan(args.plan).get("batch_size") or 64, world)
        ddp.check_methods([parse_spec(m) for m in args.method or []], world)
    argv, skip = [], False
    for a in args.argv:  # drop --nproc N: the ranks are the processes
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        argv += [] if skip else [a]
    if not args.resume and not args.out:
        argv += ["--out", ddp.default_out()]
    cuda = (args.device or "gtx750-1gb") != "cpu" and _cuda()
    code = ddp.launch(argv, args.nproc, cuda)
    if code != 0:
        print(f"edgetrain fit: a rank failed (exit {code}); the last checkpoint is kept: continue with --resume "
              f"{args.resume or args.out or 'runs/last'} --nproc {args.nproc}", file=sys.stderr)  # fmt: skip
    return code


def _size(text: str) -> int:
    from edgetrain.devices.profile import parse_size
    from edgetrain.errors import ConfigError, ProfileError

    try:
        return parse_size(text)
    except ProfileError:
        raise ConfigError(f"--keep-free must be a size like 256MiB, got {text!r}") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _from_plan(path: str | None) -> dict:
    """What a plan file records it was made for, as fit options (the user's own options win,
    and the recipe refuses any that differ from the plan's)."""
    if not path:
        return {}
    from edgetrain.planning import Plan

    plan = Plan.load(path)
    req = plan.request
    rec = {"model": req.model, "batch_size": req.batch_size, "input_size": req.input_shape[-1],
           "optimizer": req.optimizer, "device": req.device}  # fmt: skip
    return {k: v for k, v in rec.items() if v is not None and v != "model"}


def summary_line(report: dict, out: str) -> str:
    """The run in one line; the budget is compared with the device-level peak, the tensor level
    (what the guard measured) is shown as what it is."""
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    measured = report["measured_peak_bytes"]
    tensors = f"{mib(measured)} measured, " if measured else "not measured (no step ran), "
    return (f"{report['model']} on {report['device']} ({report['plan']}): test accuracy {report['test_accuracy']:.2%}; "
            f"device-level peak {mib(report['predicted_device_bytes'])} predicted against a budget of "
            f"{mib(report['budget_bytes'])} (tensors: {tensors}{mib(report['predicted_peak_bytes'])} predicted); "
            f"run in {out}")  # fmt: skip
