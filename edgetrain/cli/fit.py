"""`edgetrain fit`: plan, apply and train on the device's budget; resumable."""

from __future__ import annotations

import argparse
import sys

from edgetrain.cli.common import Verb, add_json, print_json


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
        p.add_argument("--device", "-d", default="gtx750-1gb", help="device profile to fit (see `edgetrain devices`)")
        p.add_argument("--model", "-m", default="cifar_resnet20")
        p.add_argument("--data", default="digits", help="'digits', an ImageFolder directory, or CIFAR-10 batches")
        p.add_argument("--epochs", type=int, default=8)
        p.add_argument("--batch-size", "-b", type=int, default=64)
        p.add_argument("--input-size", "-s", type=int, default=32)
        p.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: sgd 0.1 x batch/256, adamw 1e-3)")  # fmt: skip
        p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--method", action="append", default=[], metavar="SPEC", help="force methods instead of planning"
        )
        p.add_argument("--prefer", choices=("speed", "accuracy"), default="speed", help="the planner's objective")
        p.add_argument("--plan", metavar="YAML", help="use this plan file (e.g. an earlier run's plan.yaml)")
        p.add_argument("--init", metavar="PT", help="start from these weights (an earlier run's model.pt); "
                       "with tucker2/cp they are converted, and the errors reported")  # fmt: skip
        p.add_argument(
            "--out", default="", help="run directory (default runs/<date-time>; runs/last points at the newest)"
        )
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        p.add_argument("--ckpt-every", type=int, default=20, help="steps between checkpoints")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.train.recipe import FitConfig, fit

        cfg = FitConfig(
            device=args.device, model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
            input_size=args.input_size, lr=args.lr, optimizer=args.optimizer, seed=args.seed,
            out=args.resume or args.out, methods=args.method, plan=args.plan, init=args.init, prefer=args.prefer, ckpt_every=args.ckpt_every, quiet=args.json,
        )  # fmt: skip
        report = fit(cfg, resume=bool(args.resume))
        if args.json:
            print_json(report)
        else:
            measured = report["measured_peak_bytes"]
            meas = f"{measured / 2**20:.0f} MiB measured" if measured else "not measured (no step ran)"
            print(f"{report['model']} on {report['device']} ({report['plan']}): "
                  f"test accuracy {report['test_accuracy']:.2%}; peak {meas} / {report['predicted_peak_bytes'] / 2**20:.0f} "
                  f"MiB predicted, budget {report['budget_bytes'] / 2**20:.0f} MiB; run in {cfg.out}")  # fmt: skip
        if not report["learned"]:
            print(f"edgetrain fit: did not learn: test accuracy {report['test_accuracy']:.1%} is near chance "
                  f"({report['chance_accuracy']:.1%}): try more --epochs (now {cfg.epochs}), a lower --lr "
                  f"(now {report['config']['lr']:g}), or check that the class folders of --data hold what their names say",
                  file=sys.stderr)  # fmt: skip
        return 0
