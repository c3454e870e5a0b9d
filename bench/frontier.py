"""The memory/time frontier (issue 21): edgetrain's plans along the Pareto front against two peers,
whole-step tensor-level peak and step time as ratios to plain, measured in one run.

    .venv/bin/python bench/frontier.py [--quick] [--cases resnet18,mobilenet_v2,vgg11_bn]

For resnet18 b64, mobilenet_v2 b64 and vgg11_bn b32 at 224 px (SGD with momentum):
- edgetrain: the planner's frontier at `--allow lossy` (planning/frontier.py, modelled), and up to
  `POINTS` plans along its front, each applied and measured;
- checkpoint-everything: `checkpoint` on every block;
- torch's selective activation checkpointing: the model under `torch.compile` with
  `torch._functorch.config.activation_memory_budget` at `SAC_BUDGETS` (its knapsack picks what to
  recompute), and at 1.0 (compiled, no budget). Each runs in a process of its own (a compile is
  cached per code object) beside an eager plain step, whose time is its ratio's reference.

Peak: the largest bytes of live tensors in the step, from the profiler's allocation events (they
see inside compiled code, which a dispatch mode does not), plus what lives across steps (weights,
buffers, optimizer state, the input batch). Time: medians of interleaved steps.
Writes bench/frontier.txt's rows to stdout, bench/out/frontier.json and bench/frontier.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from memtracker import allocator_peak

from edgetrain.core.step import make_optimizer, optimizer_state_tensors, train_step
from edgetrain.methods.base import prepare
from edgetrain.models import create_model
from edgetrain.planning.record import Choices, apply_plan_
from edgetrain.planning.search import plan_for

HERE = Path(__file__).parent
MiB = 2**20
CASES = [("resnet18", 64), ("mobilenet_v2", 64), ("vgg11_bn", 32)]
SAC_BUDGETS = (1.0, 0.5, 0.1)
POINTS = 6  # edgetrain plans measured along the front
SHAPE = (3, 224, 224)


def profiled_peak(step, held: list[torch.Tensor]) -> int:
    """Peak bytes of live tensors during `step()`: what is held going in, plus the CPU allocator's
    peak above it from the profiler's allocation events (compiled kernels' buffers included)."""
    seen, base = set(), 0
    for t in held:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            base += t.untyped_storage().nbytes()
    return base + allocator_peak(step)


def held_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, *batch: torch.Tensor) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *optimizer_state_tensors(opt), *batch]


def batch_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, *SHAPE), torch.randint(0, 10, (n,))


def interleaved(steps: list, repeat: int) -> list[float]:
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeat):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def eager_step(model, opt, x, y, settings=None):
    kw = {} if settings is None else {"settings": settings}
    return lambda: train_step(model, x, y, opt, **kw)


def front_points(name: str, batch: int, n: int) -> tuple[list[dict], list[dict]]:
    """The planner's modelled frontier, and up to `n` of its front's plans spread from lightest to fastest."""
    t0 = time.perf_counter()
    plan = plan_for(create_model(name, num_classes=10), SHAPE, batch, "cpu", name=name, num_classes=10,
                    budget_bytes=1 << 42, allow="lossy", frontier=True)  # fmt: skip
    print(f"  {name} b{batch}: frontier planned in {time.perf_counter() - t0:.1f} s", flush=True)
    front = sorted(
        (r for r in plan.frontier if r["front"] and r["plan"] != "plain"), key=lambda r: r["peak_device_bytes"]
    )
    if len(front) > n:
        front = [front[round(i * (len(front) - 1) / (n - 1))] for i in range(n)]
    return plan.frontier, front


def measure_case(name: str, batch: int, repeat: int) -> list[dict]:
    """plain, edgetrain's front plans and checkpoint-everything in this process; torch SAC in children."""
    frontier, front = front_points(name, batch, POINTS)
    x, y = batch_of(batch)
    variants = [("plain", "plain", None, None), ("checkpoint-everything", "peer", None, ["checkpoint"])]  # fmt: skip
    variants += [(r["plan"], "edgetrain", r, None) for r in front]
    rows, steps = [], []
    for label, kind, row, methods in variants:
        model = create_model(name, num_classes=10)
        if row is not None:
            settings = apply_plan_(model, Choices(**row["choices"]))
        else:
            model, _, settings = prepare(model, methods or [])
        opt = make_optimizer("sgd", model.parameters())
        step = eager_step(model, opt, x, y, settings)
        step()  # warm-up: momentum exists, caches are filled
        peak = profiled_peak(step, held_tensors(model, opt, x, y))
        rows.append({"model": name, "batch": batch, "method": label, "kind": kind, "peak": peak,
                     "modelled_time": row["time_factor"] if row else None})  # fmt: skip
        steps.append(step)
        print(f"    {label[:60]:<60} peak {peak / MiB:8.1f} MiB", flush=True)
    for r, sec in zip(rows, interleaved(steps, repeat), strict=True):
        r["seconds"] = sec
    for budget in SAC_BUDGETS:
        rows.append(sac_in_child(name, batch, budget, repeat, rows[0]))
    plain = rows[0]
    for r in rows:
        r["peak_ratio"] = r["peak"] / plain["peak"]
        r["time_ratio"] = r.get("time_ratio") or r["seconds"] / plain["seconds"]
    return rows, frontier


def sac_in_child(name: str, batch: int, budget: float, repeat: int, plain: dict) -> dict:
    cmd = [sys.executable, __file__, "--sac-child", json.dumps([name, batch, budget, repeat])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"    torch SAC budget {budget}: failed ({tail[:120]})", flush=True)
        return {"model": name, "batch": batch, "method": f"torch SAC budget={budget}", "kind": "torch",
                "peak": float("nan"), "seconds": float("nan"), "time_ratio": float("nan"), "error": tail}  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    label = "torch.compile (no budget)" if budget >= 1.0 else f"torch SAC budget={budget}"
    print(f"    {label:<60} peak {got['peak'] / MiB:8.1f} MiB (compile {got['compile_s']:.0f} s)", flush=True)
    return {"model": name, "batch": batch, "method": label, "kind": "torch", "peak": got["peak"],
            "seconds": got["seconds"], "time_ratio": got["seconds"] / got["plain_seconds"],
            "compile_s": got["compile_s"], "eager_plain_seconds_here": got["plain_seconds"]}  # fmt: skip


def sac_child(name: str, batch: int, budget: float, repeat: int) -> None:
    """One torch.compile variant at an activation-memory budget, timed beside an eager plain step."""
    x, y = batch_of(batch)
    plain_model = create_model(name, num_classes=10)
    plain_opt = make_optimizer("sgd", plain_model.parameters())
    plain = eager_step(plain_model, plain_opt, x, y)
    model = create_model(name, num_classes=10)
    opt = make_optimizer("sgd", model.parameters())
    compiled = torch.compile(model)

    def step():
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    with torch._functorch.config.patch(activation_memory_budget=budget):
        step()  # compiles forward and backward under the budget
    compile_s = time.perf_counter() - t0
    plain()
    peak = profiled_peak(step, held_tensors(model, opt, x, y))
    sec, plain_sec = interleaved([step, plain], repeat)
    print(json.dumps({"peak": peak, "seconds": sec, "plain_seconds": plain_sec, "compile_s": compile_s}))


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':<16} {'method':<58} {'peak MiB':>9} {'x plain':>8} {'step s':>7} {'x plain':>8}")
    for r in rows:
        case = f"{r['model']} b{r['batch']}"
        print(f"{case:<16} {r['method'][:58]:<58} {r['peak'] / MiB:>9.1f} "
              f"{r['peak_ratio']:>8.3f} {r['seconds']:>7.2f} {r['time_ratio']:>8.2f}")  # fmt: skip


def best_at(rows: list[dict], limits=(1.1, 1.3, 2.0)) -> list[str]:
    """The largest peak reduction reached within each time limit, by anything measured."""
    out = []
    for lim in limits:
        ok = [r for r in rows if r["time_ratio"] <= lim and r["peak_ratio"] == r["peak_ratio"]]
        best = min(ok, key=lambda r: r["peak_ratio"])  # plain itself at worst
        out.append(f"  at <= {lim:.1f}x time: {1 / best['peak_ratio']:.2f}x lower peak ({best['method'][:70]})")
    return out


def measured_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both peak and time, lightest first."""
    ok = sorted(
        (r for r in rows if r["peak_ratio"] == r["peak_ratio"]), key=lambda r: (r["peak_ratio"], r["time_ratio"])
    )
    front, best = [], float("inf")
    for r in ok:
        if r["time_ratio"] < best:
            front.append(r)
            best = r["time_ratio"]
    return front


def plot(cases: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from edgetrain.cli.plan import _short

    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 5.6), squeeze=False)
    style = {"edgetrain": ("o", "#1f77b4", "edgetrain plans (--allow lossy)"),
             "peer": ("s", "#2ca02c", "checkpoint-everything"),
             "torch": ("^", "#d62728", "torch.compile + activation_memory_budget"), "plain": ("*", "k", "plain (eager)")}  # fmt: skip
    for ax, (case, rows) in zip(axes[0], cases.items(), strict=True):
        mine = [r for r in rows if r["kind"] in ("edgetrain", "plain")]
        front = measured_front(mine)
        ax.plot([r["time_ratio"] for r in front], [r["peak_ratio"] for r in front], "-", color="#1f77b4", lw=1.2,
                alpha=0.6, label="edgetrain's measured front")  # fmt: skip
        for kind, (marker, color, label) in style.items():
            pts = [r for r in rows if r["kind"] == kind and r["peak_ratio"] == r["peak_ratio"]]
            ax.scatter([r["time_ratio"] for r in pts], [r["peak_ratio"] for r in pts], marker=marker, color=color,
                       s=110 if kind == "plain" else 40, label=label, zorder=4)  # fmt: skip
            for i, r in enumerate(pts if kind in ("edgetrain", "torch") else []):
                text = r["method"].replace("torch SAC ", "SAC ") if kind == "torch" else _short(r["method"], 30)
                ax.annotate(text, (r["time_ratio"], r["peak_ratio"]), fontsize=6.5, color=color,
                            xytext=(5, 5 if i % 2 else -9), textcoords="offset points")  # fmt: skip
        ax.axvline(1.3, color="#999999", ls=":", lw=1)
        ax.axhline(1 / 8, color="#999999", ls="--", lw=1)
        ax.text(ax.get_xlim()[0], 1 / 8, " 8x lower", va="bottom", ha="left", fontsize=7, color="#666666")
        ax.set_yscale("log")
        ax.set_yticks([t for t in (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0) if t >= ax.get_ylim()[0]])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        plain_mib = rows[0]["peak"] / MiB
        ax.set_xlabel("step time (x eager plain, same process)")
        ax.set_ylabel(f"whole-step tensor peak (x plain = {plain_mib:,.0f} MiB)")
        ax.set_title(f"{case} 224px, SGD: measured on a 2-core CPU", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--cases", default=",".join(n for n, _ in CASES))
    ap.add_argument("--replot", action="store_true", help="draw bench/frontier.png again from bench/out/frontier.json")
    ap.add_argument("--sac-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sac_child:
        return sac_child(*json.loads(args.sac_child))
    if args.replot:
        rows = json.loads((HERE / "out" / "frontier.json").read_text())["rows"]
        cases = {}
        for r in rows:
            cases.setdefault(f"{r['model']} b{r['batch']}", []).append(r)
        return plot(cases, HERE / "frontier.png")
    repeat = 2 if args.quick else 3
    all_rows, cases, frontiers = [], {}, {}
    for name, batch in [c for c in CASES if c[0] in args.cases.split(",")]:
        print(f"{name} b{batch} 224px", flush=True)
        rows, frontiers[f"{name} b{batch}"] = measure_case(name, batch, repeat)
        cases[f"{name} b{batch}"] = rows
        all_rows += rows
        print_table(rows)
        print("\n".join(best_at(rows)), flush=True)
    print_table(all_rows)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "frontier.json").write_text(json.dumps({"rows": all_rows, "modelled": frontiers}, indent=1))
    plot(cases, HERE / "frontier.png")


if __name__ == "__main__":
    main()
