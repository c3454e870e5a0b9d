"""The levers on gradients and optimizer state against the plain step: the optimizer step fused
into backward (`step-in-backward`), and the state kept in bf16 or int8 (`optim-state`).

    .venv/bin/python bench/step_in_backward.py [--quick] [--levers step|state] [--cases resnet18,vgg11_bn]

For resnet18 (b32) and vgg11_bn (b8) at 224 px, SGD with momentum and AdamW, side by side in one
run: the whole step's tensor-level peak (predicted with fake tensors, and measured on a real
step), the peak RSS of a fresh process running the step (what the OOM killer sees) against its
host-side prediction, and the step time (medians of interleaved steps), each as a ratio to plain.
`--levers state` runs the optimizer-state rows (bench/optim_state.txt). Writes
bench/out/step_in_backward.json (or optim_state.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timing import interleaved_times

from edgetrain.core.step import StepSpec
from edgetrain.memory.measure import tracked_step
from edgetrain.methods.base import prepare
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.calibrate import resolve_profile
from edgetrain.train.probe import measure_in_subprocess

OUT = Path(__file__).parent / "out"
MiB = 2**20
CASES = [("resnet18", 32), ("vgg11_bn", 8)]
LEVERS = {
    "step": [[], ["step-in-backward"]],
    "state": [
        [],
        ["optim-state:dtype=bf16"],
        ["optim-state:dtype=int8"],
        ["step-in-backward", "optim-state:dtype=int8"],
    ],
}


def case_rows(model_name: str, batch: int, optimizer: str, repeat: int, levers: list[list[str]]) -> list[dict]:
    """Each lever set on one case: estimate, real tracked step, fresh-process RSS, interleaved time."""
    shape, host = (3, 224, 224), resolve_profile("cpu")
    rows, steps = [], []
    for methods in levers:
        model = create_model(model_name, num_classes=10)
        est = estimate(model, shape, batch, optimizer, host, methods).predicted
        m, _, settings = prepare(model, methods)
        spec = StepSpec(shape, batch, 10, optimizer, settings)
        real = tracked_step(m, spec, fake=False)
        probe = measure_in_subprocess({"model": model_name, "num_classes": 10, "input_shape": list(shape),
                                       "batch_size": batch, "optimizer": optimizer, "methods": methods})  # fmt: skip
        steps.append((m, spec))
        rows.append({"model": model_name, "batch": batch, "optimizer": optimizer,
                     "method": "+".join(methods) or "plain", "predicted": est.peak_total_bytes,
                     "measured": real.peak_bytes, "predicted_process": est.peak_process_bytes,
                     "rss": probe["peak_rss_bytes"], "gradients_at_peak": real.peak_by_category.get("gradients", 0)})  # fmt: skip
    for row, sec in zip(rows, interleaved_times(steps, repeat, optimizer), strict=True):
        row["seconds"] = sec
    for row in rows:
        for key in ("measured", "rss", "seconds"):
            row[f"{key}_ratio"] = row[key] / rows[0][key]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--levers", choices=sorted(LEVERS), default="step")
    ap.add_argument("--cases", default="resnet18,vgg11_bn", help="models to run (of resnet18, vgg11_bn)")
    args = ap.parse_args()
    what = "optimizer step in backward" if args.levers == "step" else "optimizer state kept packed"
    print(f"{what} vs plain, 224 px (tensor peak: predicted / measured; process: fresh-process "
          "peak RSS against the host-side prediction; time: median of interleaved steps)")  # fmt: skip
    print(f"{'case':<14} {'opt':<6} {'method':<40} {'pred MiB':>9} {'meas MiB':>9} {'x plain':>8} "
          f"{'RSS MiB':>8} {'RSS err':>8} {'x plain':>8} {'step s':>7} {'x plain':>8}")  # fmt: skip
    rows = []
    for model_name, batch in [c for c in CASES if c[0] in args.cases.split(",")]:
        for optimizer in ("sgd", "adamw"):
            for r in case_rows(model_name, batch, optimizer, 2 if args.quick else 5, LEVERS[args.levers]):
                rows.append(r)
                err = r["predicted_process"] / r["rss"] - 1
                print(f"{f'{model_name} b{batch}':<14} {optimizer:<6} {r['method']:<40} {r['predicted'] / MiB:>9.1f} "
                      f"{r['measured'] / MiB:>9.1f} {r['measured_ratio']:>8.3f} {r['rss'] / MiB:>8.0f} {err:>+8.1%} "
                      f"{r['rss_ratio']:>8.3f} {r['seconds']:>7.2f} {r['seconds_ratio']:>8.3f}")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    name = "step_in_backward" if args.levers == "step" else "optim_state"
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
