"""Planning time over the 18-case grid (selector issue): resnet18, mobilenet_v2, vgg11_bn at 224 px,
batch 32/64/128, on the 1 GB GTX 750 and the 4 GB Jetson Nano, at the default `--allow lossy`
and at `--allow architecture`.

    .venv/bin/python bench/planning_time.py [--batches 32,64,128] [--repeats 1]

Each case is planned in this process from a fresh model (no cache shared between cases but the
one-time imports, paid before the first timing). Prints the plan or the one-line answer, its
predicted device peak against the budget, and the seconds (median of --repeats).
Writes bench/out/planning_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError
from edgetrain.models import create_model
from edgetrain.planning import plan_for

OUT = Path(__file__).parent / "out"
MiB = 2**20
MODELS = ("resnet18", "mobilenet_v2", "vgg11_bn")
DEVICES = ("gtx750-1gb", "jetson-nano")
LEVELS = ("lossy", "architecture")


def plan_once(name: str, batch: int, device: str, allow: str) -> tuple[float, str, float | None]:
    model = create_model(name)
    t = time.perf_counter()
    try:
        p = plan_for(model, (3, 224, 224), batch, device, allow=allow, name=name)
        answer, peak = p.summary(), p.predicted.peak_device_bytes / MiB
    except BudgetError as e:
        answer, peak = "nothing fits: " + str(e).split("; ")[-1][:70], None
    return time.perf_counter() - t, answer, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    plan_once("resnet18", 32, "jetson-nano", "lossy")  # imports and the first fake step's set-up
    print(f"{'case':<30} {'allow':<12} {'s':>6} {'MiB':>6} {'budget':>6}  plan")
    rows = []
    for name in MODELS:
        for device in DEVICES:
            budget = get_device(device).usable_memory_bytes / MiB
            for batch in map(int, args.batches.split(",")):
                for allow in LEVELS:
                    runs = [plan_once(name, batch, device, allow) for _ in range(args.repeats)]
                    secs = statistics.median(r[0] for r in runs)
                    _, answer, peak = runs[-1]
                    rows.append({"model": name, "device": device, "batch": batch, "allow": allow, "seconds": secs,
                                 "plan": answer, "peak_mib": peak, "budget_mib": budget})  # fmt: skip
                    shown = f"{peak:>6.0f}" if peak else f"{'-':>6}"
                    print(f"{name + ' b' + str(batch) + ' ' + device:<30} {allow:<12} {secs:>6.1f} {shown} "
                          f"{budget:>6.0f}  {answer}", flush=True)  # fmt: skip
    secs = [r["seconds"] for r in rows]
    print(f"\n{len(rows)} plans: median {statistics.median(secs):.1f} s, max {max(secs):.1f} s, "
          f"{sum(s <= 10 for s in secs)} of {len(secs)} within 10 s")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "planning_time.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
