"""The grid's plans, run (selector issue): each plan of the 18-case grid (resnet18, mobilenet_v2,
vgg11_bn at 224 px, batch 32/64/128, GTX 750 and Jetson Nano, `--allow lossy` and `architecture`)
takes one real training step on this host, in a fresh process, under the budget guard at the
device's budget.

    .venv/bin/python bench/grid_steps.py [--models vgg11_bn] [--batches 32] [--devices jetson-nano]

Per distinct plan: the tensor peak the planner predicted for the device, the tensor peak predicted
for this host's step (the same plan, this host's profile), the real step's tracked tensor peak, and
the errors; the device level the plan was chosen by, against the budget (a CUDA figure: this host
has no GPU, so it stays a prediction); this host's peak RSS against its process-level prediction.
Writes bench/out/grid_steps.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError, EdgetrainError
from edgetrain.memory.predict import num_classes_of
from edgetrain.models import create_model
from edgetrain.planning import plan_for
from edgetrain.planning.search import estimate_plan
from edgetrain.train.validate import host_check

OUT = Path(__file__).parent / "out"
MiB = 2**20
SIZE = 224


def check(name: str, batch: int, device: str, plan) -> dict:
    """The plan's device prediction, and its real step on this host (`host_check`: a fresh process,
    under the guard at the device's budget) beside this host's prediction of the same plan."""
    model = create_model(name)  # as planned: `create_model`'s default head
    host = estimate_plan(model, plan, plan.request, get_device("cpu")).predicted
    budget = get_device(device).usable_memory_bytes
    req = {"model": name, "num_classes": num_classes_of(model), "input_shape": [3, SIZE, SIZE], "batch_size": batch,
           "optimizer": plan.request.optimizer, "plan": plan.to_dict(), "budget": budget}  # fmt: skip
    t = time.perf_counter()
    h = host_check(req, host)
    real, pred = h["host_measured_tensor_bytes"], plan.predicted
    return {
        "device_tensor": pred.peak_total_bytes, "device_level": pred.peak_device_bytes, "budget": budget,
        "host_tensor": h["host_predicted_tensor_bytes"], "meas_tensor": real,
        "host_process": h["host_predicted_process_bytes"], "meas_rss": h["host_measured_process_bytes"],
        "tensor_err": h["host_tensor_error"], "device_tensor_err": pred.peak_total_bytes / real - 1,
        "process_err": h["host_process_error"], "step_s": time.perf_counter() - t,
    }  # fmt: skip


def _plans(args: argparse.Namespace):
    """(case, allow, plan or None) for every case; a plan met twice is run once (the cases share it)."""
    for name in args.models.split(","):
        for device in args.devices.split(","):
            for batch in map(int, args.batches.split(",")):
                for allow in ("lossy", "architecture"):
                    try:
                        plan = plan_for(create_model(name), (3, SIZE, SIZE), batch, device, allow=allow, name=name)
                    except BudgetError:
                        plan = None
                    yield name, batch, device, allow, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,vgg11_bn")
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--devices", default="gtx750-1gb,jetson-nano")
    args = ap.parse_args()
    print("MiB; tensor err = host prediction / real step - 1; device err = the device plan's tensor peak / real - 1")
    print(f"{'case':<28} {'allow':<6} {'device':>6} {'budget':>6} {'dev-t':>6} {'host-t':>6} {'real-t':>6} "
          f"{'t err':>6} {'dev err':>7} {'RSS err':>7} {'step s':>6}  plan")  # fmt: skip
    rows, seen = [], {}
    for name, batch, device, allow, plan in _plans(args):
        case = f"{name} b{batch} {device}"
        if plan is None:
            print(f"{case:<28} {allow[:6]:<6} nothing fits at this level", flush=True)
            continue
        key = (name, batch, plan.choices.summary())
        if key not in seen:
            try:
                seen[key] = check(name, batch, device, plan)
            except EdgetrainError as e:  # a time-out (fp16 runs slowly on a CPU): the line, and on
                print(f"{case:<28} {allow[:6]:<6} not measured: {e}", flush=True)
                continue
        r = {"model": name, "batch": batch, "device": device, "allow": allow, "plan": key[2], **seen[key]}
        rows.append(r)
        print(f"{case:<28} {allow[:6]:<6} {r['device_level'] / MiB:>6.0f} {r['budget'] / MiB:>6.0f} "
              f"{r['device_tensor'] / MiB:>6.0f} {r['host_tensor'] / MiB:>6.0f} {r['meas_tensor'] / MiB:>6.0f} "
              f"{r['tensor_err']:>+6.1%} {r['device_tensor_err']:>+7.1%} {r['process_err']:>+7.1%} "
              f"{r['step_s']:>6.0f}  {key[2]}", flush=True)  # fmt: skip
    errs = [abs(r["tensor_err"]) for r in rows]
    print(
        f"\n{len(rows)} plans ({len(seen)} distinct) ran under the guard; host tensor error at most "
        f"{max(errs):.1%}; every device level under its budget: {all(r['device_level'] <= r['budget'] for r in rows)}"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "grid_steps.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
