"""Fleets: federated accuracy against centralized training, bytes a round, per-client memory, DDP.

    .venv/bin/python bench/fleet.py            # about 10 minutes on 2 cores; writes bench/fleet.txt

1. Digits, 8 clients (jetson-nano, jetson-orin-nano, gtx750-1gb in turn), 10 rounds of 2 local
   epochs, cifar_resnet20, SGD lr 0.05, batch 32, on Flower's simulation engine: FedAvg and FedProx
   on label-skewed clients (label:2, each holds about 2 classes), FedAvg on dirichlet:0.5 and IID.
   Centralized: the same model, optimizer and batches on all the clients' data together, 20 epochs
   (as many passes over the data as 10 rounds of 2 local epochs). Rounds to 95 % test accuracy.
2. Bytes a client sends each round with everything trainable and with the last stage only.
3. Each client's measured peak (the budget guard's, first local step) against its budget.
4. DDP on this CPU: median step time for 1 and 2 processes (64 images a step in total), and the
   loss curves of both on one plot (bench/fleet_ddp_loss.png).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetrain.core.step import make_optimizer, train_step
from edgetrain.fleet.data import client_data
from edgetrain.fleet.server import plot_accuracy
from edgetrain.fleet.simulate import simulate
from edgetrain.fleet.torch_client import build_model, evaluate_arrays, exchanged, get_arrays, train_mode_
from edgetrain.fleet.wire import FleetConfig, nbytes

HERE = Path(__file__).parent
DEVICES = ["jetson-nano", "jetson-orin-nano", "gtx750-1gb"]
RUNS = [("fedavg", "label:2"), ("fedprox", "label:2"), ("fedavg", "dirichlet:0.5"), ("fedavg", "iid")]


def federated(tmp: Path) -> dict[str, dict]:
    out = {}
    for strategy, part in RUNS:
        cfg = FleetConfig(rounds=10, min_clients=8, local_epochs=2, batch_size=32, lr=0.05, partition=part,
                          strategy=strategy, proximal_mu=0.01)  # fmt: skip
        t0 = time.perf_counter()
        report = simulate(cfg, 8, DEVICES, str(tmp / f"{strategy}-{part}"))
        report["wall_s"] = time.perf_counter() - t0
        out[f"{strategy} {part}"] = report
        print(
            f"  {strategy} {part}: {report['final_accuracy']:.2%} after 10 rounds ({report['wall_s']:.0f} s)",
            flush=True,
        )
    return out


def centralized(epochs: int = 20) -> list[tuple[int, float]]:
    """Accuracy after every 2 epochs (one 'round' of passes), on all the data in one place."""
    cfg = FleetConfig(lr=0.05, batch_size=32)
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in client_data(cfg, {}))
    model, g = build_model(cfg), torch.Generator().manual_seed(0)
    opt = make_optimizer("sgd", model.parameters(), cfg.lr)
    curve = [(0, evaluate_arrays(model, xte, yte)[1])]
    for ep in range(epochs):
        train_mode_(model)
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(order) - 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            train_step(model, xtr[idx], ytr[idx], opt)
        if ep % 2 == 1:
            curve.append(((ep + 1) // 2, evaluate_arrays(model, xte, yte)[1]))
    return curve


def ddp(tmp: Path) -> dict[int, dict]:
    out = {}
    for n in (1, 2):
        run = tmp / f"ddp{n}"
        cmd = [sys.executable, "-m", "edgetrain.cli.main", "fit", "--device", "cpu", "--model", "cifar_resnet20",
               "--batch-size", "64", "--epochs", "2", "--nproc", str(n), "--out", str(run), "--json"]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        report = json.loads((run / "report.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[n] = {"median_step_s": report["median_step_seconds"], "wall_s": time.perf_counter() - t0,
                  "accuracy": report["test_accuracy"], "loss": [r["loss"] for r in rows if "loss" in r]}  # fmt: skip
        print(f"  DDP {n} process(es): {out[n]['median_step_s'] * 1000:.0f} ms a step", flush=True)
    return out


def plot_ddp(runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    for n, style in ((1, "-"), (2, "--")):
        ax.plot(runs[n]["loss"], style, label=f"{n} process{'es' if n > 1 else ''} x {64 // n} images")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("fit --nproc: cifar_resnet20 on digits, 64 images a step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="edgetrain-fleet-bench-"))
    lines = ["# bench/fleet.py: fleets on Flower's simulation engine and DDP, 2-core CPU host", ""]
    print("federated runs (8 clients, 10 rounds x 2 local epochs):", flush=True)
    saved = HERE / "out" / "fleet_federated.json"
    if "--reuse" in sys.argv and saved.is_file():  # the federated runs of an earlier bench run
        fed = json.loads(saved.read_text())
    else:
        fed = federated(tmp)
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(fed))
    print("centralized, 20 epochs:", flush=True)
    central = centralized()
    lines += ["## 1. Test accuracy (%) by round: digits, cifar_resnet20, 8 clients, 2 local epochs a round", "",
              "| run | " + " | ".join(f"r{r}" for r in range(0, 11, 2))
              + " | final | final, clients' own statistics pooled | rounds to 95 % |",
              "|---|" + "---|" * 9]  # fmt: skip
    curves = {}
    for name, rep in fed.items():
        acc = {h["round"]: h["accuracy"] for h in rep["history"]}
        curves[name] = sorted(acc.items())
        own = rep["history"][-1].get("accuracy_averaged_statistics")
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in range(0, 11, 2))
                     + f" | {100 * rep['final_accuracy']:.1f} | {100 * own:.1f} | {rep['rounds_to_95'] or '> 10'} |")  # fmt: skip
    cacc = dict(central)
    curves["centralized (2 epochs a point)"] = central
    c95 = next((r for r, a in central if a >= 0.95 and r > 0), None)
    lines.append("| centralized, same data in one place | " + " | ".join(f"{100 * cacc[r]:.1f}" for r in range(0, 11, 2))
                 + f" | {100 * central[-1][1]:.1f} | - | {c95 or '> 10'} |")  # fmt: skip
    plot_accuracy(curves, HERE / "fleet_accuracy.png", "digits, cifar_resnet20, 8 clients vs one place")
    lines += ["", "The server evaluates each round's averaged weights twice: with BatchNorm statistics of those weights",
              "pooled from the clients' data (what the fleet keeps), and with the running statistics the clients",
              "kept while training, pooled the same way (the last column but one).", "", "Plot: bench/fleet_accuracy.png.", "", "## 2. Bytes a client sends each round (and receives)", "",
              "| trainable | tensors | bytes | MiB |", "|---|---|---|---|"]  # fmt: skip
    for label, pattern in (("everything", ""), ("last stage only (layers.6-8, fc)", "layers.6,layers.7,layers.8,fc")):
        model = build_model(FleetConfig(trainable=pattern))
        b = nbytes(get_arrays(model))
        lines.append(f"| {label} | {len(exchanged(model))} | {b:,} | {b / 2**20:.2f} |")
    rep = fed["fedavg label:2"]
    lines += ["", "## 3. Each client's measured peak (first local step, budget guard) against its budget (fedavg label:2, last round)",
              "", "| client | device | plan | peak MiB | budget MiB | peak / budget |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in sorted(rep["history"][-1]["client_figures"], key=lambda c: c["name"]):
        lines.append(f"| {c['name']} | {c['device']} | {c['plan']} | {c['peak-bytes'] / 2**20:.1f} | "
                     f"{c['budget-bytes'] / 2**20:.0f} | {c['peak-bytes'] / c['budget-bytes']:.3f} |")  # fmt: skip
    print("DDP:", flush=True)
    runs = ddp(tmp)
    plot_ddp(runs, HERE / "fleet_ddp_loss.png")
    gap = max(abs(a - b) for a, b in zip(runs[1]["loss"], runs[2]["loss"], strict=False))
    lines += ["", "## 4. DDP on this CPU (`fit --nproc`), cifar_resnet20, 64 images a step, 2 epochs", "",
              "| processes | median step ms | ratio to 1 | wall s | test accuracy % |", "|---|---|---|---|---|"]  # fmt: skip
    for n in (1, 2):
        lines.append(f"| {n} | {runs[n]['median_step_s'] * 1000:.0f} | {runs[n]['median_step_s'] / runs[1]['median_step_s']:.2f} | "
                     f"{runs[n]['wall_s']:.0f} | {100 * runs[n]['accuracy']:.1f} |")  # fmt: skip
    lines += ["", f"Largest gap between the two loss curves: {gap:.3f} (BatchNorm statistics are per rank: "
              "32 images each instead of 64). Plot: bench/fleet_ddp_loss.png."]  # fmt: skip
    (HERE / "fleet.txt").write_text("\n".join(lines) + "\n")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "fleet.json").write_text(json.dumps({"federated": fed, "centralized": central,
                                                          "ddp": runs}, default=float))  # fmt: skip
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
