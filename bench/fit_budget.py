"""fit under a device budget vs plain training without one: same model, data, seeds, epochs.

    .venv/bin/python bench/fit_budget.py [--model mobilenet_v2 --batch 128 --size 64 --epochs 10]

mobilenet_v2 at batch 128, 64 px needs 802 MiB of tensors, 900 MiB at the GTX 750's device level,
as is; a GTX 750 leaves 724 MiB for training. fit plans (checkpointing here), trains under the
budget guard, and should land within 1 point of the unconstrained run. Prints a table, writes bench/out/fit_budget.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgetrain.train.recipe import FitConfig, fit

OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: fit's own (sgd 0.1 x batch/256)")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    rows = []
    for device in ("cpu", "gtx750-1gb"):
        t0 = time.perf_counter()
        cfg = FitConfig(device=device, model=args.model, batch_size=args.batch, input_size=args.size, epochs=args.epochs,
                        lr=args.lr, out=str(OUT / "runs" / f"budget-{device}-{int(time.time())}"), quiet=True)  # fmt: skip
        r = fit(cfg)
        rows.append({"device": device, "methods": r["plan"], "accuracy": r["test_accuracy"],
                     "predicted_peak": r["predicted_peak_bytes"], "predicted_device": r["predicted_device_bytes"],
                     "measured_peak": r["measured_peak_bytes"],
                     "budget": r["budget_bytes"], "seconds": time.perf_counter() - t0})  # fmt: skip
    mib = 2**20
    print(f"{args.model} b{args.batch} {args.size}px, {args.epochs} epochs on digits")
    print(
        "tensor peaks: predicted (fake tensors) vs measured (budget guard, real steps); device level: + allocator model"
    )
    print(f"{'device':<12} {'plan':<15} {'accuracy':>9} {'pred MiB':>9} {'meas MiB':>9} {'device MiB':>11} "
          f"{'budget MiB':>11} {'time s':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['device']:<12} {r['methods']:<15} {r['accuracy']:>9.2%} {r['predicted_peak'] / mib:>9.1f} "
              f"{r['measured_peak'] / mib:>9.1f} {r['predicted_device'] / mib:>11.1f} {r['budget'] / mib:>11.1f} "
              f"{r['seconds']:>7.0f}")  # fmt: skip
    print(f"accuracy difference: {abs(rows[0]['accuracy'] - rows[1]['accuracy']) * 100:.2f} points")
    (OUT / "fit_budget.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
