"""Memory model accuracy: predicted vs measured peak over a grid of models, batches and sizes.

    .venv/bin/python bench/memory_grid.py [--quick] [--method SPEC]... [--device PROFILE]

Each case is predicted with fake tensors here and measured in a fresh process (one real
training step, SGD with momentum). Prints a table and writes bench/out/memory_grid.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgetrain.train.validate import compare_case

GRID = {"models": ["resnet18", "mobilenet_v2", "vgg11_bn"], "batches": [16, 32, 64], "sizes": [64, 128]}
QUICK = {"models": ["cifar_resnet20", "resnet18"], "batches": [8, 32], "sizes": [32, 64]}
OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    ap.add_argument("--method", action="append", default=[], help="method spec applied to every case")
    ap.add_argument(
        "--device",
        default="cpu",
        help="profile; a CUDA one measures on the GPU (run `edgetrain profile --save` there first)",
    )
    args = ap.parse_args()
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


def _fmt(r: dict) -> str:
    mib = 2**20
    return (
        f"{r['model']:<15} b{r['batch']:<3} {r['size']:>3}px {r['methods']:<10} "
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
