"""`edgetrain export`: onnxruntime-training artifacts for fine-tuning on a board."""

from __future__ import annotations

import argparse

from edgetrain.cli.common import Verb, add_json, print_json
from edgetrain.errors import ConfigError


class Export(Verb):
    name = "export"
    help = "write onnxruntime-training artifacts (+ manifest) for on-device fine-tuning"
    examples = (
        "edgetrain export --run runs/last --out artifacts --trainable 'layers.8.*,fc'",
        "edgetrain export --checkpoint runs/mine/checkpoint.pt --out art --optimizer adamw",
        "edgetrain export --model cifar_resnet20 --num-classes 10 --input-size 32 --out art --bn batch",
        "edgetrain finetune art --data digits:shift=1   # then, on the board",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", "-m", help="a model name, freshly initialised (no weights are downloaded)")
        src.add_argument("--run", metavar="RUN_DIR", help="a finished `edgetrain fit` run (its checkpoint and plan)")
        src.add_argument("--checkpoint", metavar="FILE", help="an `edgetrain fit` checkpoint.pt")
        p.add_argument("--out", "-o", required=True, help="directory for the artifacts")
        p.add_argument(
            "--plan", metavar="YAML", help="apply this plan's methods first (custom-autograd ones are left out)"
        )
        p.add_argument(
            "--trainable", help="parameters to train on the board: patterns like 'layer4.*,fc' (default all)"
        )
        p.add_argument("--loss", choices=("ce", "mse"), default="ce")
        p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
        p.add_argument("--bn", choices=("frozen", "batch"), default="frozen",
                       help="BatchNorm on the board: running statistics fixed (frozen) or batch statistics")  # fmt: skip
        p.add_argument("--input-size", "-s", type=int, default=32, help="with --model: input height and width")
        p.add_argument("--num-classes", type=int, default=10, help="with --model: classes of the head")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.export.onnx import export_artifacts

        model, shape, classes, plan = load_source(args)
        manifest = export_artifacts(model, args.out, shape, classes, args.trainable, args.loss, args.optimizer,
                                    args.bn, plan.to_dict() if plan else None)  # fmt: skip
        if args.json:
            print_json(manifest)
        else:
            off = ", ".join(manifest["methods_not_in_graph"]) or "none"
            print(f"wrote {args.out}: {len(manifest['trainable'])} trainable and {len(manifest['frozen'])} frozen "
                  f"tensors, input {manifest['input']['shape']}, BatchNorm {args.bn}; methods left out of the graph: {off}")  # fmt: skip
        return 0


def load_source(args: argparse.Namespace):
    """(model with weights and plan applied, input shape, class names, plan) from --model/--run/--checkpoint."""
    from pathlib import Path

    from edgetrain.models import create_model
    from edgetrain.planning import Plan, apply_plan_
    from edgetrain.train import checkpoint as ckpt

    if args.model:
        model, shape = create_model(args.model, args.num_classes), (3, args.input_size, args.input_size)
        classes, plan, weights = [str(i) for i in range(args.num_classes)], None, None
    else:
        path = Path(args.checkpoint or Path(args.run) / "checkpoint.pt")
        if not path.is_file():
            raise ConfigError(f"{path}: no such checkpoint; give a finished run directory or its checkpoint.pt")
        state = ckpt.load(path)
        cfg, classes = state["config"], list(state["classes"])
        model, shape = create_model(cfg["model"], len(classes)), tuple(state["input_shape"])
        plan, weights = Plan.from_dict(state["plan"], str(path)), state["model"]
    if args.plan:
        plan = Plan.load(args.plan)
    if plan is not None:
        apply_plan_(model, plan)
    if weights is not None:
        from edgetrain.methods.lowrank import resize_to_

        resize_to_(model, weights)
        model.load_state_dict(weights)
    return model, shape, classes, plan
