"""The plots compare the budget with the device level, stay readable far under budget, and keep
legends off titles and lines."""

from __future__ import annotations

import matplotlib
import pytest

from edgetrain.memory.plot import MIB, timeline_figure
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def est():
    return estimate(create_model("cifar_resnet8"), (3, 16, 16), 8, device="jetson-nano", name="cifar_resnet8")


def _hlines(ax) -> dict[str, float]:
    return {ln.get_label(): ln.get_ydata()[0] for ln in ax.get_lines() if len(ln.get_ydata())}


def test_far_under_budget_the_budget_is_written_not_drawn(est):
    device = est.predicted.peak_device_bytes
    fig = timeline_figure(est.report, "t", est.budget_bytes, device)
    ax = fig.axes[0]
    lines = _hlines(ax)
    assert lines[f"device level {device / MIB:,.0f} MiB"] == pytest.approx(device / MIB)
    assert not any(label.startswith("budget") for label in lines)  # not drawn: it would flatten the plot
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("off the scale" in t and f"{device / est.budget_bytes:.0%} used" in t for t in labels)
    assert ax.get_ylim()[1] < 1.3 * device / MIB  # the breakdown fills the plot
    phase_y = [t.get_position()[1] for t in ax.texts if t.get_text() in ("forward", "backward")]
    assert phase_y and all(y > 0.9 for y in phase_y)  # at the top of the axes, not under the fill


def test_near_the_budget_both_lines_are_drawn_and_the_budget_is_against_the_device_level(est):
    device = est.predicted.peak_device_bytes
    budget = int(device * 1.1)
    ax = timeline_figure(est.report, "t", budget, device).axes[0]
    lines = _hlines(ax)
    label = f"budget {budget / MIB:,.0f} MiB ({device / budget:.0%} used)"
    assert lines[label] == pytest.approx(budget / MIB)
    assert ax.get_ylim()[1] > budget / MIB


def test_plan_figure_marks_each_bars_device_level():
    from edgetrain.cli.plan import plan_figure
    from edgetrain.planning import plan_for

    model = create_model("cifar_resnet8")
    plain = estimate(model, (3, 32, 32), 64, device="cpu").predicted.peak_device_bytes
    plan = plan_for(model, (3, 32, 32), 64, "cpu", name="cifar_resnet8", budget_bytes=int(0.8 * plain))
    assert not plan.is_plain
    ax = plan_figure(plan).axes[0]
    ys = sorted(seg[0][1] for c in ax.collections if hasattr(c, "get_segments") for seg in c.get_segments())
    want = sorted([plan.candidates[0]["peak_device_bytes"] / MIB, plan.predicted.peak_device_bytes / MIB])
    assert ys == pytest.approx(want)
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside the bars


def test_curves_legend_stays_off_the_title(tmp_path):
    import matplotlib.pyplot as plt

    from edgetrain.train.report import plot_curves

    hist = [{"step": i, "loss": 2.3 / (1 + i)} for i in range(1, 30)]
    hist += [{"step": 10 * e, "test_accuracy": 0.3 * e} for e in (1, 2, 3)]
    captured = {}
    real = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        plot_curves(hist, tmp_path / "c.png", "a title")
    finally:
        plt.close = real
    fig = captured["fig"]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, title = ax.get_legend().get_window_extent(), ax.title.get_window_extent()
    assert not legend.overlaps(title)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
