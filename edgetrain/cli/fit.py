"""`edgetrain fit`: plan, apply and train on the device's budget; resumable."""

from __future__ import annotations

import argparse
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
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.train.recipe import RUN_OPTIONS, FitConfig, fit

        asked = {k: getattr(args, "method" if k == "methods" else k) for k in RUN_OPTIONS}
        asked = {k: v for k, v in asked.items() if v is not None}
        given = {} if args.resume else {**_from_plan(args.plan), **asked}
        cfg = FitConfig(**given, out=args.resume or args.out, ckpt_every=args.ckpt_every,
                        skip_unused=args.skip_unused, quiet=args.json)  # fmt: skip
        report = fit(cfg, resume=bool(args.resume), asked=asked)
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
