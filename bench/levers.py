"""Accuracy of each lever the planner can pick, against plain: digits, 3 seeds.

    .venv/bin/python bench/levers.py [--epochs 6] [--seeds 0,1,2] [--only optim-state]

cifar_resnet20 trained on scikit-learn's digits at 32 px with each lever forced (`fit --method`),
the same seeds and epochs; test accuracy mean, min and max, and the change against plain in points.
The exact levers should match plain to run-to-run noise; the lossy and architecture ones show
what they cost here. Writes bench/out/levers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics

from compression import OUT, seeded_accuracies

from edgetrain.levels import CHANGE_LEVELS
from edgetrain.methods.base import change_level, handler_for, parse_spec
from edgetrain.train.recipe import FitConfig

LEVERS = [
    [],
    ["checkpoint"],
    ["step-in-backward"],
    ["optim-state:dtype=bf16"],
    ["optim-state:dtype=int8"],
    ["microbatch:micro_batches=4"],
    ["microbatch:micro_batches=8"],  # 8, 4, 2 and 1 image(s) per micro-batch at the batch of 64: what BatchNorm sees
    ["microbatch:micro_batches=16"],
    ["microbatch:micro_batches=32"],
    ["microbatch:micro_batches=64"],
    ["precision:dtype=bf16"],
    ["compress:bits=8"],
    ["compress:bits=4"],
    ["compress:bits=2"],
    ["tucker2:ratio=0.25"],
    # the headline plan of bench/frontier.txt (resnet18 b64 224 px, 8.7x lower peak at 1.19x time): its
    # levers on every layer here, micro-batches of one image at the default batch of 64
    ["optim-state:dtype=int8", "microbatch:micro_batches=64", "checkpoint", "compress:bits=8"],
    # its lightest neighbour whose micro-batches hold 4 images (resnet18 b64: 5.6x lower peak at 0.78x time)
    ["microbatch:micro_batches=16", "compress:bits=8"],
]


def _picked(specs: str, only: str) -> bool:
    """`--only a|b`: lever sets containing a or b; `=spec` picks the set that is exactly `spec`."""
    return any(specs == o[1:] if o.startswith("=") else o in specs for o in only.split("|"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--only",
        default="",
        help="just the lever sets whose specs contain one of these ('|'-separated, '=spec' for exactly that set; plain always runs)",
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"accuracy of each lever, cifar_resnet20 on digits at 32 px, {args.epochs} epochs, seeds {seeds}")
    print(f"{'lever':<28} {'level':<13} {'risk':>4} {'mean':>8} {'min':>8} {'max':>8} {'vs plain':>9}")
    rows = []
    for methods in [m for m in LEVERS if not m or _picked(" + ".join(m), args.only)]:
        accs = seeded_accuracies(methods, seeds, args.epochs, "lever-" + ("-".join(methods) or "plain"))
        cs = [
            handler_for(c).at_batch(c, FitConfig.batch_size) for c in map(parse_spec, methods)
        ]  # its risk at this batch
        level = max((change_level(c) for c in cs), key=CHANGE_LEVELS.index, default="-")
        row = {"lever": " + ".join(methods) or "plain", "level": level, "risk": max((int(c.risk) for c in cs), default=0),
               "accuracies": accs, "mean": statistics.mean(accs)}  # fmt: skip
        row["vs_plain"] = row["mean"] - rows[0]["mean"] if rows else 0.0
        rows.append(row)
        print(f"{row['lever'][:60]:<28} {row['level']:<13} {row['risk']:>4} {row['mean']:>8.2%} {min(accs):>8.2%} "
              f"{max(accs):>8.2%} {row['vs_plain'] * 100:>+8.2f}", flush=True)  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "levers.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
