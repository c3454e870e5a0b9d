"""Activation compression (issue 5): saved bytes, step time and accuracy, side by side with plain.

    .venv/bin/python bench/compression.py [--quick] [--only bytes|accuracy]

1. resnet18 and vgg11_bn at 32 px and 224 px (resnet18 b32, vgg11_bn b8): saved-activation bytes
   of one real training step (edgetrain's tracker), ratio to plain fp32, the issue's target, the
   whole-step peak and its ratio to plain (saved bytes alone mislead), the estimate's error against
   the measured peak, and the median step time as a ratio to plain (same run; on a CPU the codec runs
   eager, in chunks; `EDGETRAIN_FUSED=on` runs the compiled kernels).
2. digits accuracy (cifar_resnet20, fixed seeds, same epochs): plain vs 8/4/2-bit vs base+delta,
   mean and seed spread.
Writes bench/out/compression.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import interleaved_times

from edgetrain.core.step import StepSpec
from edgetrain.memory.measure import tracked_step
from edgetrain.methods.base import prepare
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.recipe import FitConfig, fit

OUT = Path(__file__).parent / "out"
MiB = 2**20
METHODS = [
    ("plain", [], None),
    ("8-bit", ["compress:bits=8"], 0.26),
    ("4-bit", ["compress:bits=4"], 0.14),
    ("2-bit", ["compress:bits=2"], 0.08),
    ("2-bit, ReLU output shared", ["compress:bits=2,relu=shared"], 0.08),
    ("base+delta (Facto-CNN)", ["compress:scheme=similar,bits=2"], 0.32),
]


def bytes_table(quick: bool, models: tuple[str, ...] = ("resnet18", "vgg11_bn")) -> list[dict]:
    print("\n1. saved activations and step time, ratios to plain fp32 (real steps; methods take turns, medians)")
    print(f"{'case':<22} {'method':<24} {'saved MiB':>10} {'x plain':>8} {'target':>7} {'peak MiB':>9} {'x plain':>8} "
          f"{'est err':>8} {'step s':>7} {'x plain':>8}")  # fmt: skip
    rows = []
    for name in models:
        for size, batch in ((32, 32), (224, 4 if quick else 32 if name == "resnet18" else 8)):
            model = create_model(name)
            case, steps = [], []
            for label, methods, target in METHODS:
                m, _, settings = prepare(model, methods)
                spec = StepSpec((3, size, size), batch, 10, settings=settings)
                rep = tracked_step(m, spec, fake=False)
                pred = estimate(model, (3, size, size), batch, methods=methods).predicted.peak_total_bytes
                case.append((label, target, rep, pred))
                steps.append((m, spec))
            secs = interleaved_times(steps, 2 if quick else 5)
            for (label, target, rep, pred), sec in zip(case, secs, strict=True):
                row = {"model": name, "size": size, "batch": batch, "method": label, "saved": rep.saved_activation_bytes,
                       "ratio": rep.saved_activation_bytes / case[0][2].saved_activation_bytes, "target": target,
                       "peak": rep.peak_bytes, "peak_ratio": rep.peak_bytes / case[0][2].peak_bytes,
                       "estimate_error": pred / rep.peak_bytes - 1, "seconds": sec,
                       "time_ratio": sec / secs[0]}  # fmt: skip
                rows.append(row)
                print(f"{f'{name} {size}px b{batch}':<22} {label:<24} {row['saved'] / MiB:>10.2f} {row['ratio']:>8.3f} "
                      f"{target or '-':>7} {row['peak'] / MiB:>9.1f} {row['peak_ratio']:>8.3f} "
                      f"{row['estimate_error']:>+8.2%} {sec:>7.3f} {row['time_ratio']:>8.2f}")  # fmt: skip
    return rows


def seeded_accuracies(methods: list[str], seeds: list[int], epochs: int, tag: str) -> list[float]:
    """Test accuracy of cifar_resnet20 trained on digits at 32 px with `methods`, one run per seed."""
    accs = []
    for seed in seeds:
        out = OUT / "runs" / f"{tag}-{seed}-{int(time.time() * 1000)}"
        cfg = FitConfig(device="cpu", model="cifar_resnet20", epochs=epochs, seed=seed, out=str(out), quiet=True,
                        methods=methods)  # fmt: skip
        accs.append(fit(cfg)["test_accuracy"])
    return accs


def accuracy_table(seeds: list[int], epochs: int) -> list[dict]:
    print(f"\n2. digits accuracy, cifar_resnet20, {epochs} epochs at 32 px, seeds {seeds}")
    rows = []
    for label, methods, _ in METHODS:
        if "masks" in label:  # same numerics as 2-bit except the ReLU masks, which are exact either way
            continue
        accs = seeded_accuracies(methods, seeds, epochs, f"compress-{len(rows)}")
        row = {"method": label, "accuracies": accs, "mean": statistics.mean(accs)}
        row["vs_plain"] = row["mean"] - rows[0]["mean"] if rows else 0.0
        rows.append(row)
        print(f"   {label:<24} mean {row['mean']:.2%}  (min {min(accs):.2%}, max {max(accs):.2%})  "
              f"{row['vs_plain'] * 100:+.2f} points vs plain")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("bytes", "accuracy"))
    ap.add_argument("--models", default="resnet18,vgg11_bn", help="models of the bytes table")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    tables = {
        "bytes": lambda: bytes_table(args.quick, tuple(args.models.split(","))),
        "accuracy": lambda: accuracy_table([0] if args.quick else [0, 1, 2], 2 if args.quick else 4),
    }
    result = {name: fn() for name, fn in tables.items() if args.only in (None, name)}
    suffix = f"_{args.only}" if args.only else ""
    (OUT / f"compression{suffix}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
