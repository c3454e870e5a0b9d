"""`edgetrain estimate`: predicted (and optionally measured) peak training memory, by category."""

from __future__ import annotations

import argparse
import sys

from edgetrain.cli.common import Verb, add_json, mib, print_json, table
from edgetrain.devices.profile import parse_size
from edgetrain.errors import BudgetError, ConfigError


def add_model_args(p: argparse.ArgumentParser, batch: int = 64, size: int = 224) -> None:
    """--model, -b, -s, --num-classes, --optimizer: the step everything else reasons about."""
    p.add_argument("--model", "-m", default="resnet18", help="model name (see `edgetrain models`)")
    p.add_argument("--batch-size", "-b", type=int, default=batch, help="batch size")
    p.add_argument("--input-size", "-s", type=int, default=size, help="input height and width in pixels")
    p.add_argument("--channels", type=int, default=3, help="input channels")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")


class Estimate(Verb):
    name = "estimate"
    help = "predict a training step's peak memory by category (nothing allocated)"
    examples = (
        "edgetrain estimate --model resnet18 -b 64 -s 224",
        "edgetrain estimate -m mobilenet_v2 -b 32 -s 128 --device jetson-nano --json",
        "edgetrain estimate -m resnet18 -b 32 -s 64 --method checkpoint --measure",
        "edgetrain estimate -m resnet18 -b 64 -s 224 --measure --budget device --device gtx750-1gb",
        "edgetrain estimate -m vgg11_bn -b 16 -s 128 --plot mem.png",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_args(p)
        p.add_argument("--device", "-d", help="device profile name (see `edgetrain devices`) or YAML path")
        p.add_argument("--method", action="append", default=[], metavar="SPEC",
                       help="force a method on every eligible layer: name[:key=value,...] (repeatable)")  # fmt: skip
        p.add_argument("--skip-unused", action="store_true",
                       help="drop a --method that finds no eligible layer (with a line) instead of refusing")  # fmt: skip
        p.add_argument("--measure", action="store_true", help="also run one real step (fresh process) and report it")
        p.add_argument("--budget", help="with --measure: run under the budget guard (a size like 700MiB, or 'device')")
        p.add_argument("--plot", metavar="PNG", help="write the memory timeline plot")
        add_json(p)

    def run(self, args: argparse.Namespace) -> int:
        from edgetrain.models import create_model
        from edgetrain.planning.estimate import estimate
        from edgetrain.train.calibrate import resolve_profile

        model = create_model(args.model, args.num_classes)
        shape = (args.channels, args.input_size, args.input_size)
        device = resolve_profile(args.device) if args.device else None
        est = estimate(model, shape, args.batch_size, args.optimizer, device, args.method, args.num_classes,
                       args.model, skip_unused=args.skip_unused)  # fmt: skip
        for spec in est.skipped:
            print(f"edgetrain estimate: --method {spec} skipped: no eligible layer in {args.model}", file=sys.stderr)
        if args.measure:
            est.host_check = _measure(args, shape, est)
        if args.plot:
            from edgetrain.memory.plot import plot_timeline

            title = f"{args.model} b{args.batch_size} {args.input_size}px {'+'.join(est.methods) or 'plain'}"
            plot_timeline(est.report, args.plot, title, est.budget_bytes, est.predicted.peak_device_bytes)
        if args.json:
            print_json(est.to_dict())
        else:
            _print(est)
        return 0


def _measure(args: argparse.Namespace, shape: tuple[int, int, int], est) -> dict:
    from edgetrain.train.validate import host_check

    budget = None
    if args.budget:
        if args.budget == "device":
            if est.budget_bytes is None:
                raise ConfigError("--budget device needs --device NAME")
            from edgetrain.devices.store import get_device
            from edgetrain.memory.guard import tensor_budget

            budget = tensor_budget(get_device(args.device))
        else:
            budget = parse_size(args.budget, "--budget", "budget")
        if budget <= est.predicted.peak_by_category["parameters"]:
            raise BudgetError(f"budget {mib(budget)} is below the parameters' own size: give a larger --budget")
    req = {"model": args.model, "num_classes": args.num_classes, "input_shape": list(shape),
           "batch_size": args.batch_size, "optimizer": args.optimizer, "methods": args.method, "budget": budget, "cuda": _on_gpu(est)}  # fmt: skip
    return host_check(req, _host_prediction(args, shape, est))


def _host_prediction(args: argparse.Namespace, shape: tuple[int, int, int], est):
    """The prediction for the machine that measures: the estimate itself when it was made for this
    machine (the CPU host, or the GPU it runs on), else the same step predicted for this host."""
    if _on_gpu(est) or est.device == "cpu":
        return est.predicted
    from edgetrain.models import create_model
    from edgetrain.planning.estimate import estimate
    from edgetrain.train.calibrate import resolve_profile

    model = create_model(args.model, args.num_classes)
    return estimate(model, shape, args.batch_size, args.optimizer, resolve_profile("cpu"), args.method,
                    args.num_classes, args.model, skip_unused=args.skip_unused).predicted  # fmt: skip


def _on_gpu(est) -> bool:
    """Measure on the GPU when the target is a GPU device and this machine has one."""
    import torch

    return est.device is not None and est.device != "cpu" and torch.cuda.is_available()


def _print(est) -> None:
    p = est.predicted
    rows = [[c, mib(v)] for c, v in p.peak_by_category.items()]
    rows += [["peak (tensors)", mib(p.peak_total_bytes)], ["peak (device, allocator model)", mib(p.peak_device_bytes)],
             ["peak (process)", mib(p.peak_process_bytes)], ["saved activations", mib(p.saved_activation_bytes)]]  # fmt: skip
    h = est.host_check
    if h:  # tensors are the same on every machine; the process level is this host's, on its own line
        measured = (h["host_measured_tensor_bytes"], None, None, h["host_measured_saved_activation_bytes"])
        for row, v in zip(rows[-4:], measured, strict=True):
            row.append(mib(v) if v is not None else "-")
    cols = ["category", f"predicted MiB ({est.device or 'no device'})"] + (["measured here MiB"] if h else [])
    what = f"{est.model} b{est.batch_size} {est.input_shape[1]}px {est.optimizer} {'+'.join(est.methods) or 'plain'}"
    table(f"{what}: peak at {p.peak_phase} ({p.peak_op})", cols, rows)
    print(_counts_line(est.counts, est.plain_counts))
    if est.budget_bytes is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        print(f"{est.device}: device-level peak {mib(p.peak_device_bytes)} against a budget of "
              f"{mib(est.budget_bytes)}: {verdict}")  # fmt: skip
    if h:
        print(host_line(h))


def host_line(h: dict) -> str:
    """One line of a host check: this machine's measured process peak against its own prediction."""
    return (f"this host ({h['machine'].split(': ', 1)[1]}): {mib(h['host_measured_process_bytes'])} measured, "
            f"{mib(h['host_predicted_process_bytes'])} predicted for this host ({h['host_process_error']:+.1%}); "
            f"tensors {h['host_tensor_error']:+.2%}")  # fmt: skip


def _counts_line(c: dict, plain: dict | None) -> str:
    """'parameters 5.57 M (plain 11.69 M, 0.48x), trainable 5.57 M; forward 0.282 GFLOP a sample (...)'."""

    def vs(key: str, scale: float, unit: str) -> str:
        return f" (plain {plain[key] / scale:.3g} {unit}, {c[key] / max(1, plain[key]):.2f}x)" if plain else ""

    return (f"parameters {c['parameters'] / 1e6:.3g} M{vs('parameters', 1e6, 'M')}, trainable "
            f"{c['trainable_parameters'] / 1e6:.3g} M; forward {c['forward_flops'] / 1e9:.3g} GFLOP a sample"
            f"{vs('forward_flops', 1e9, 'GFLOP')}")  # fmt: skip
