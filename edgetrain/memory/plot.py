"""Memory plots (matplotlib PNG): a step's live bytes by category over time."""

from __future__ import annotations

from pathlib import Path

from edgetrain.memory.tracker import CATEGORIES, MemoryReport

COLORS = dict(zip(CATEGORIES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"), strict=True))


def plot_timeline(report: MemoryReport, path: str | Path, title: str = "", budget: int | None = None) -> Path:
    """Stacked live bytes by category after every allocation/free, phases shaded, peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, series = report.timeline()
    mib = 2**20
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(x, *[[v / mib for v in series[c]] for c in CATEGORIES], labels=CATEGORIES,
                 colors=[COLORS[c] for c in CATEGORIES], alpha=0.85)  # fmt: skip
    for i, (phase, a, b) in enumerate(report.phase_spans()):
        if i % 2:
            ax.axvspan(a, b, color="grey", alpha=0.08)
        ax.text((a + b) / 2, 0, phase, ha="center", va="bottom", fontsize=7, color="dimgrey")
    peak_at = max(range(len(x)), key=lambda i: sum(series[c][i] for c in CATEGORIES)) if x else 0
    ax.axhline(report.peak_bytes / mib, color="black", lw=0.8, ls="--")
    ax.annotate(f"peak {report.peak_bytes / mib:.1f} MiB ({report.peak_phase}, {report.peak_op})",
                (peak_at, report.peak_bytes / mib), textcoords="offset points", xytext=(5, 5), fontsize=8)  # fmt: skip
    if budget:
        ax.axhline(budget / mib, color="red", lw=1, label="budget")
    ax.set_xlabel("allocation / free event")
    ax.set_ylabel("live MiB")
    ax.set_title(title or "training step memory")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
