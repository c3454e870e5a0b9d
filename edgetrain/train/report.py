"""What a finished run leaves behind: report.json, metrics.jsonl, curves.png and memory.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgetrain.memory.plot import budget_lines, plot_timeline
from edgetrain.methods import fused
from edgetrain.models import create_model
from edgetrain.planning.record import PlanRequest
from edgetrain.planning.search import estimate_plan
from edgetrain.train.evaluate import Evaluation


def write_report(recipe, ev: Evaluation) -> dict[str, Any]:
    """Predict the plan's memory once more, and write the run's report (with the final
    evaluation `ev`) and plots."""
    from edgetrain.train.recipe import median_step_time

    cfg, out = recipe.cfg, Path(recipe.out)
    fresh = create_model(cfg.model, len(recipe.data.classes))
    request = PlanRequest(cfg.model, recipe.data.input_shape, cfg.batch_size, cfg.optimizer, recipe.profile.name)
    est = estimate_plan(fresh, recipe.plan, request, recipe.profile, len(recipe.data.classes))
    evals = [h for h in recipe.history if "test_accuracy" in h]
    report = {
        "model": cfg.model, "device": recipe.profile.name, "data": cfg.data, "epochs": cfg.epochs, "steps": recipe.step,
        "methods": recipe.plan.specs(), "plan": recipe.plan.summary(), "levers": recipe.plan.choices.levers(), "test_accuracy": ev.accuracy, "test_loss": ev.loss,
        "learned": ev.learned(), "chance_accuracy": ev.chance, "classes": recipe.data.classes,
        "per_class_accuracy": ev.per_class_accuracy, "confusion": ev.confusion, "recoveries": recipe.recoveries,
        "accuracy_by_epoch": [h["test_accuracy"] for h in evals],
        "predicted_peak_bytes": est.predicted.peak_total_bytes, "predicted_device_bytes": est.predicted.peak_device_bytes,
        "measured_peak_bytes": recipe.measured_peak, "budget_bytes": est.budget_bytes,
        "median_step_seconds": median_step_time(recipe.step_times), "config": vars(cfg),
        "skipped_images": len(recipe.data.skipped),  # the files: skipped_images.txt
        "data_bytes": data_bytes(recipe.data),  # decoded once into this process (no DataLoader workers)
        "parameters": sum(p.numel() for p in recipe.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in recipe.model.parameters() if p.requires_grad),
        "lowrank": recipe.conversion, "replans": recipe.replans, "memory_watch": _watch_summary(recipe),
        "codec_compile_seconds": dict(fused.compile_seconds),  # paid once per codec, not per step
    }  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in recipe.history))
    _write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    plot_confusion(ev, recipe.data.classes, out / "confusion.png", f"{cfg.model} on {cfg.data}: test confusion")
    plot_curves(recipe.history, out / "curves.png", f"{cfg.model} on {cfg.data} ({recipe.plan.summary()})")
    plot_timeline(est.report, out / "memory.png", f"{cfg.model} b{cfg.batch_size} on {recipe.profile.name}",
                  est.budget_bytes, est.predicted.peak_device_bytes)  # fmt: skip
    if recipe.watch is not None and recipe.watch.log:
        plot_pressure(recipe.watch.log, recipe.replans, recipe.profile.usable_memory_bytes, out / "memory_run.png",
                      f"{cfg.model} b{cfg.batch_size}: memory watched ({recipe.watch.source and recipe.watch.source.name})")  # fmt: skip
    return report


def data_bytes(data) -> int:
    """Bytes of the decoded training and test tensors the process holds for the whole run."""
    return sum(t.numel() * t.element_size() for ds in (data.train, data.test) for t in ds.tensors)


def _watch_summary(recipe) -> dict[str, Any] | None:
    """What was watched for memory pressure, and the tightest moment."""
    w = recipe.watch
    if w is None or not w.log:
        return None
    low = min(w.log, key=lambda r: r["budget_bytes"])
    return {"source": w.source.name if w.source else None, "keep_free_bytes": w.keep_free, "readings": len(w.log),
            "lowest_budget_bytes": low["budget_bytes"], "lowest_at_step": low["step"], "plot": "memory_run.png"}  # fmt: skip


def plot_pressure(log: list[dict], replans: list[dict], profile_budget: int, path: Path, title: str) -> None:
    """The budget each step had (what was available, held and kept free), the active plan's predicted
    peak, and every change of plan, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    known = [r for r in log if r["plan_peak_bytes"] is not None]  # a forced plan's peak is estimated only when needed
    peak = max((r["plan_peak_bytes"] for r in known), default=0)
    top = max(2.5 * peak, 1.3 * min(r["budget_bytes"] for r in log)) / mib  # the plan's scale: larger budgets clip
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.step([r["step"] for r in log], [min(r["budget_bytes"] / mib, top) for r in log], where="post", color="C0",
            label=f"budget for the next step (held + available - kept free; clipped at {top:,.0f})")  # fmt: skip
    if known:
        ax.step([r["step"] for r in known], [r["plan_peak_bytes"] / mib for r in known], where="post", color="C1",
                label="active plan: predicted device peak")  # fmt: skip
        top = budget_lines(ax, peak, profile_budget, top, draw_device=False)  # the profile's budget, or its value
    else:
        top *= 1.12
        ax.plot([], [], " ", label=f"profile budget {profile_budget / mib:,.0f} MiB")
    for i, e in enumerate(replans):
        ax.axvline(e["step"], color="grey", lw=0.8, ls=":")
        ax.text(e["step"], top * (0.85 - 0.06 * (i % 2)), f" -> {e['to']}", fontsize=7, color="dimgrey")
    ax.set_ylim(0, top)
    ax.set_xlabel("step")
    ax.set_ylabel("MiB (device level)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training loss by step and test accuracy by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "test_accuracy" in h]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=0.8, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([h["step"] for h in evals], [h["test_accuracy"] for h in evals], "o-", color="C1", label="test accuracy")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0, 1.05)
    ax.set_title(title)
    lines = ax.get_lines() + ax2.get_lines()  # one legend for both axes, inside, clear of the title
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_confusion(ev: Evaluation, classes: list[str], path: Path, title: str) -> None:
    """The test confusion matrix, rows normalized (true class), counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(ev.confusion)  # (K, K)
    rates = counts / np.maximum(1, counts.sum(1, keepdims=True))
    k = len(classes)
    side = min(12.0, 3.0 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(k), classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
        ax.set_yticks(range(k), [f"{c} ({a:.0%})" if a is not None else c
                                 for c, a in zip(classes, ev.per_class_accuracy, strict=True)])  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (per-class accuracy)")
    ax.set_title(f"{title}\naccuracy {ev.accuracy:.1%} (chance {ev.chance:.1%})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
