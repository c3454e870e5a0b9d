"""The planner (issue 7): plans for resnet18 / mobilenet_v2 / vgg11_bn at 224 px on the 1 GB GTX 750
and the 4 GB Jetson Nano, checked against real steps and against what a user would try first.

    .venv/bin/python bench/planner.py [--measure CASES|none] [--batches 32,64,128] [--allow LEVEL]

1. prediction grid (all cases, fake tensors): planning time, the plan, its predicted device
   peak against the budget; and whether the simple strategies fit: checkpoint every block,
   half precision everywhere (fp16 autocast on these Maxwell GPUs: no bf16), halving the batch.
2. measured (the cases named by --measure, default every b32 case that fits): one real step of
   the plan under the device's budget guard, its tensor peak against the prediction, and the step
   time of the plan and of each simple strategy as a ratio to plain (same run, per sample).
Writes bench/out/planner.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from edgetrain.core.step import StepSpec, make_optimizer, train_step
from edgetrain.devices.store import get_device
from edgetrain.errors import BudgetError
from edgetrain.memory.guard import tensor_budget
from edgetrain.memory.measure import tracked_step
from edgetrain.methods.base import prepare
from edgetrain.models import create_model
from edgetrain.planning import apply_plan_, plan_for
from edgetrain.planning.estimate import estimate

OUT = Path(__file__).parent / "out"
MiB = 2**20
MODELS = ("resnet18", "mobilenet_v2", "vgg11_bn")
DEVICES = ("gtx750-1gb", "jetson-nano")
SIMPLE = {"checkpoint all": ["checkpoint"], "fp16 all": ["precision:dtype=fp16"]}


def _fits(model, batch, device, methods) -> bool:
    est = estimate(model, (3, 224, 224), batch, device=device, methods=methods)
    return bool(est.fits)


def _halved(model, batch, device) -> int | None:
    b = batch // 2
    while b >= 1 and not _fits(model, b, device, []):
        b //= 2
    return b or None


def grid(batches: list[int], allow: str = "lossy") -> list[dict]:
    print(f"\n1. plans at 224 px (predicted, fake tensors), --allow {allow}")
    print(f"{'case':<32} {'plan s':>6} {'plan':<58} {'pred MiB':>9} {'budget':>7} {'ckpt all':>8} "
          f"{'fp16 all':>8} {'halve b':>7}")  # fmt: skip
    rows = []
    for name in MODELS:
        model = create_model(name)
        for device in DEVICES:
            for b in batches:
                t0 = time.perf_counter()
                try:
                    p = plan_for(model, (3, 224, 224), b, device, name=name, allow=allow)
                    summary, peak = p.summary(), p.predicted.peak_device_bytes
                except BudgetError as e:
                    p, summary, peak = None, "none: " + str(e).split(": ", 1)[1][:52], None
                secs = time.perf_counter() - t0
                simple = {k: _fits(model, b, device, v) for k, v in SIMPLE.items()}
                halve = _halved(model, b, device)
                budget = get_device(device).usable_memory_bytes
                rows.append({"model": name, "device": device, "batch": b, "plan_seconds": secs, "plan": p.to_dict() if p else None,
                             "summary": summary, "predicted": peak, "budget": budget, **simple, "halve_batch": halve})  # fmt: skip
                pk = f"{peak / MiB:.0f}" if peak else "-"
                print(f"{f'{name} b{b} {device}':<32} {secs:>6.1f} {summary[:58]:<58} {pk:>9} {budget / MiB:>7.0f} "
                      f"{'fits' if simple['checkpoint all'] else 'no':>8} {'fits' if simple['fp16 all'] else 'no':>8} "
                      f"{halve or 'no':>7}")  # fmt: skip
    return rows


def _seconds(model, batch, settings) -> float:
    """One timed real step after one warm-up step (the tracked step before it warms up too)."""
    opt = make_optimizer("sgd", model.parameters())
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    train_step(model, x, y, opt, settings)
    t0 = time.perf_counter()
    train_step(model, x, y, opt, settings)
    return time.perf_counter() - t0


def measured(rows: list[dict], cases: set[str]) -> list[dict]:
    print("\n2. measured: the plan's real step under the budget guard; step time per sample, ratio to plain")
    print(f"{'case':<32} {'pred MiB':>9} {'meas MiB':>9} {'err':>7} {'under':>6} {'plan x':>7} {'ckpt all x':>10} "
          f"{'fp16 all x':>10} {'halve b x':>9}")  # fmt: skip
    out = []
    for r in rows:
        key = f"{r['model']}:{r['device']}:{r['batch']}"
        if key not in cases or r["plan"] is None:
            continue
        from edgetrain.planning import Plan

        model, b = create_model(r["model"]), r["batch"]
        plan = Plan.from_dict(r["plan"])
        planned = copy.deepcopy(model)
        settings = apply_plan_(planned, plan)
        rep = tracked_step(planned, StepSpec((3, 224, 224), b, 10, settings=settings), fake=False,
                           budget_bytes=tensor_budget(get_device(r["device"])))  # fmt: skip
        base = _seconds(copy.deepcopy(model), b, settings.__class__()) / b
        ratio = {"plan": _seconds(planned, b, settings) / b / base}
        for label, methods in SIMPLE.items():
            if r[label]:
                m, _, st = prepare(model, methods)
                ratio[label] = _seconds(m, b, st) / b / base
        if r["halve_batch"]:
            ratio["halve"] = (
                _seconds(copy.deepcopy(model), r["halve_batch"], settings.__class__()) / r["halve_batch"] / base
            )
        pred = plan.predicted.peak_total_bytes
        row = {"case": key, "predicted": pred, "measured": rep.peak_bytes, "error": pred / rep.peak_bytes - 1,
               "under_budget": rep.peak_bytes <= tensor_budget(get_device(r["device"])), "time_ratios": ratio}  # fmt: skip
        out.append(row)

        f = {k: f"{ratio[k]:.2f}" if k in ratio else "-" for k in ("plan", "checkpoint all", "fp16 all", "halve")}
        print(f"{key:<32} {pred / MiB:>9.0f} {rep.peak_bytes / MiB:>9.0f} {row['error']:>+7.2%} "
              f"{str(row['under_budget']):>6} {f['plan']:>7} {f['checkpoint all']:>10} {f['fp16 all']:>10} {f['halve']:>9}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--measure", default="", help="model:device:batch,... (default: every b32 case with a plan; "
                    "none: no real steps)")  # fmt: skip
    ap.add_argument("--allow", default="lossy", help="exact, lossy (default) or architecture")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    rows = grid([int(b) for b in args.batches.split(",")], args.allow)
    cases = set(args.measure.split(",")) if args.measure else {f"{m}:{d}:32" for m in MODELS for d in DEVICES}
    cases -= {"none"}
    result = {"grid": rows, "measured": measured(rows, cases)}
    (OUT / "planner.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
