"""Memory plots (matplotlib PNG): a step's live bytes by category over time.

The tensor level (what the tracker sees) is drawn as what it is; the budget is compared with
the device level (the allocator model's peak), never with the tensor peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetrain.memory.tracker import CATEGORIES, MemoryReport

COLORS = dict(zip(CATEGORIES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"), strict=True))
MIB = 2**20
OFF_SCALE = 2.0  # a budget this many times the device peak is written, not drawn (it would flatten the plot)


def budget_lines(ax: Any, device_peak: int | None, budget: int | None, top: float, draw_device: bool = True) -> float:
    """The device-level peak and the budget as horizontal lines (MiB), the budget only when it is
    on the scale; returns the y-axis top to use. Both are labelled with their values."""
    if device_peak and draw_device:
        ax.axhline(device_peak / MIB, color="#444444", lw=1, ls=":", label=f"device level {device_peak / MIB:,.0f} MiB")
        top = max(top, device_peak / MIB)
    if budget:
        used = (device_peak or 0) / budget
        if device_peak and budget > OFF_SCALE * device_peak:
            ax.plot([], [], " ", label=f"budget {budget / MIB:,.0f} MiB (off the scale: {used:.0%} used)")
        else:
            ax.axhline(budget / MIB, color="red", lw=1, label=f"budget {budget / MIB:,.0f} MiB ({used:.0%} used)")
            top = max(top, budget / MIB)
    return top * 1.12


def timeline_figure(report: MemoryReport, title: str = "", budget: int | None = None, device_peak: int | None = None):
    """The figure of `plot_timeline` (returned for tests and notebooks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, series = report.timeline()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.stackplot(x, *[[v / MIB for v in series[c]] for c in CATEGORIES], labels=CATEGORIES,
                 colors=[COLORS[c] for c in CATEGORIES], alpha=0.85)  # fmt: skip
    width, narrow = max(1, len(x)), 0
    for i, (phase, a, b) in enumerate(report.phase_spans()):
        if i % 2:
            ax.axvspan(a, b, color="grey", alpha=0.08)
        row = 0.97 if (b - a) > 0.08 * width else 0.92 - 0.05 * ((narrow := narrow + 1) % 2)  # narrow: stagger
        ax.text((a + b) / 2, row, phase, ha="center", va="top", fontsize=7, color="dimgrey",
                transform=ax.get_xaxis_transform())  # fmt: skip
    peak_at = max(range(len(x)), key=lambda i: sum(series[c][i] for c in CATEGORIES)) if x else 0
    ax.axhline(report.peak_bytes / MIB, color="black", lw=0.8, ls="--")
    ax.annotate(f"tensor peak {report.peak_bytes / MIB:,.1f} MiB ({report.peak_phase}, {report.peak_op})",
                (peak_at, report.peak_bytes / MIB), textcoords="offset points", xytext=(5, 4), fontsize=8)  # fmt: skip
    ax.set_ylim(0, budget_lines(ax, device_peak, budget, report.peak_bytes / MIB))
    ax.set_xlabel("allocation / free event")
    ax.set_ylabel("live MiB (tensors)")
    ax.set_title(title or "training step memory")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_timeline(
    report: MemoryReport,
    path: str | Path,
    title: str = "",
    budget: int | None = None,
    device_peak: int | None = None,
) -> Path:
    """Stacked live tensor bytes by category after every allocation/free, phases shaded, tensor
    peak marked; the device-level peak and the budget beside it."""
    import matplotlib.pyplot as plt

    fig = timeline_figure(report, title, budget, device_peak)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
