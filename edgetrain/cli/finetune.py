"""`edgetrain finetune`: the on-device loop (onnxruntime-training and numpy; no torch needed)."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, print_json


class Finetune(Verb):
    name = "finetune"
    help = "fine-tune exported artifacts on the board (needs only onnxruntime-training, numpy, PIL)"
    examples = (
        "edgetrain finetune artifacts --data digits --epochs 3",
        "edgetrain finetune artifacts --data digits:shift=1 --out ft --lr 0.02",
        "edgetrain finetune artifacts --data ./my-images --batch-size 16 --out ft",
        "edgetrain finetune artifacts --out ft --resume",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("artifacts", help="directory written by `edgetrain export`")
        p.add_argument("--data", default="digits", help="'digits', 'digits:shift=K' or an ImageFolder directory")
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--batch-size", "-b", type=int, default=32)
        p.add_argument("--lr", type=float, default=0.01)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", "-o", default="finetuned", help="run directory: checkpoint, report, inference.onnx")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.errors import ConfigError
        from edgetrain.runtime.finetune import FinetuneConfig, finetune

        for key in ("epochs", "batch_size"):
            if getattr(args, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
        if args.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {args.lr}")
        cfg = FinetuneConfig(args.artifacts, args.data, args.epochs, args.batch_size, args.lr, args.out, args.seed,
                             quiet=args.json)  # fmt: skip
        report = finetune(cfg, resume=args.resume)
        if args.json:
            print_json(report)
        else:
            print(f"test accuracy {report['before_accuracy']:.2%} -> {report['after_accuracy']:.2%}; "
                  f"inference model {report['inference_model']}")  # fmt: skip
        return 0
