"""Memory model accuracy: predicted vs measured peak over a grid of models, batches and sizes.

    .venv/bin/python bench/memory_grid.py [--quick] [--method SPEC]... [--device PROFILE]
    .venv/bin/python bench/memory_grid.py --kinds      # every plan kind at 224 px (about 25 min)

Each case is predicted with fake tensors here and measured in a fresh process (one real
training step, SGD with momentum). Prints a table and writes bench/out/memory_grid.{json,png}.
`--kinds` runs each kind of plan (plain, checkpoint, compression, micro-batches, reversible,
low-rank, the optimizer step in backward, and combinations) on resnet18 b32/b64 and
mobilenet_v2 b32 at 224 px, and prints the process-level error as a column per kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgetrain.methods.base import UnusedMethod
from edgetrain.train.validate import compare_case

GRID = {"models": ["resnet18", "mobilenet_v2", "vgg11_bn"], "batches": [16, 32, 64], "sizes": [64, 128]}
QUICK = {"models": ["cifar_resnet20", "resnet18"], "batches": [8, 32], "sizes": [32, 64]}
OUT = Path(__file__).parent / "out"
KIND_CASES = [("resnet18", 32), ("resnet18", 64), ("mobilenet_v2", 32)]
KINDS = {
    "plain": [],
    "checkpoint": ["checkpoint"],
    "compress4": ["compress:bits=4"],
    "compress2": ["compress:bits=2"],
    "micro4": ["microbatch:micro_batches=4"],
    "reversible": ["reversible"],
    "tucker2": ["tucker2:ratio=0.25"],
    "step-in-bw": ["step-in-backward"],
    "bf16": ["precision:dtype=bf16"],
    "ckpt+c4": ["checkpoint", "compress:bits=4"],
    "micro4+ckpt": ["microbatch:micro_batches=4", "checkpoint"],
    "tucker2+c4+sib": ["tucker2:ratio=0.25", "compress:bits=4", "step-in-backward"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    ap.add_argument("--method", action="append", default=[], help="method spec applied to every case")
    ap.add_argument(
        "--device",
        default="cpu",
        help="profile; a CUDA one measures on the GPU (run `edgetrain profile --save` there first)",
    )
    ap.add_argument("--kinds", action="store_true", help="every plan kind at 224 px (a column per kind)")
    args = ap.parse_args()
    if args.kinds:
        return _kinds(args.device)
    grid = QUICK if args.quick else GRID
    rows = []
    for model in grid["models"]:
        for b in grid["batches"]:
            for s in grid["sizes"]:
                t0 = time.perf_counter()
                r = compare_case(model, b, s, args.method, device=args.device)
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                print(_fmt(r), flush=True)
    _summary(rows)
    OUT.mkdir(exist_ok=True)
    name = "memory_grid" + ("_" + "_".join(m.replace(":", "-") for m in args.method) if args.method else "")
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, OUT / f"{name}.png")


def _kinds(device: str) -> None:
    """Each kind of plan on the same steps: a table row per case, then the process-level error
    as a column per kind (the verify processes' figures: measured in a fresh process each)."""
    rows = []
    for model, b in KIND_CASES:
        for kind, methods in KINDS.items():
            t0 = time.perf_counter()
            try:
                r = {**compare_case(model, b, 224, methods, device=device), "kind": kind}
            except UnusedMethod:  # e.g. reversible: mobilenet_v2 has no run of shape-preserving blocks
                print(f"{model:<15} b{b:<3} 224px {kind}: no eligible layer, not measured", flush=True)
                continue
            r["seconds"] = time.perf_counter() - t0
            rows.append(r)
            print(_fmt(r), flush=True)
    print()
    print(f"{'process error':<18}" + "".join(f"{k:>15}" for k in KINDS))
    for model, b in KIND_CASES:
        cells = {r["kind"]: r for r in rows if r["model"] == model and r["batch"] == b}
        print(f"{model + ' b' + str(b):<18}"
              + "".join(f"{cells[k]['process_err']:>+15.2%}" if k in cells else f"{'n/a':>15}" for k in KINDS))  # fmt: skip
    _summary(rows)
    low = [r for r in rows if r["process_err"] < 0]
    print(f"predictions below the measurement: {len(low)} of {len(rows)}"
          + "".join(f"; {r['model']} b{r['batch']} {r['kind']} {r['process_err']:+.2%}" for r in low))  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "memory_grid_kinds.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, OUT / "memory_grid_kinds.png")


def _fmt(r: dict) -> str:
    mib = 2**20
    return (
        f"{r['model']:<15} b{r['batch']:<3} {r['size']:>3}px {r['methods']:<14} "
        f"tensor {r['pred_tensor'] / mib:8.1f} / {r['meas_tensor'] / mib:8.1f} MiB ({r['tensor_err']:+.2%})  "
        f"process {r['pred_process'] / mib:8.1f} / {r['meas_process'] / mib:8.1f} MiB ({r['process_err']:+.2%})"
    )


def _summary(rows: list[dict]) -> None:
    for key in ("tensor_err", "process_err"):
        errs = [abs(r[key]) for r in rows]
        print(
            f"{key}: median |error| {statistics.median(errs):.2%}, max |error| {max(errs):.2%} over {len(rows)} cases"
        )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for key, marker in (("tensor", "o"), ("process", "s")):
        ax.scatter(
            [r[f"meas_{key}"] / mib for r in rows], [r[f"pred_{key}"] / mib for r in rows], marker=marker, label=key
        )
    hi = max(max(r["meas_process"], r["pred_process"]) for r in rows) / mib
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.plot([0, hi], [0, hi * 1.1], "k:", lw=0.6)
    ax.plot([0, hi], [0, hi * 0.9], "k:", lw=0.6)
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("predicted peak (MiB)")
    ax.set_title("memory model: predicted vs measured (dotted: ±10%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
