from __future__ import annotations

import subprocess
import sys

import pytest


def test_devices_json_lists_the_five(cli_json):
    names = [d["name"] for d in cli_json("devices")]
    assert names == ["cpu", "gtx750-1gb", "jetson-nano", "jetson-orin-nano", "jetson-xavier-nx"]
    assert [d["name"] for d in cli_json("devices", "jetson*")] == [
        "jetson-nano",
        "jetson-orin-nano",
        "jetson-xavier-nx",
    ]


def test_devices_table(cli):
    code, out, _ = cli("devices")
    assert code == 0 and "jetson-nano" in out and "spec" in out


def test_methods_json(cli_json):
    names = {m["name"] for m in cli_json("methods")}
    assert {"checkpoint", "precision", "microbatch"} <= names


def test_estimate_json_fields(cli_json, tmp_path):
    png = tmp_path / "mem.png"
    doc = cli_json(
        "estimate", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--device", "gtx750-1gb", "--plot", str(png)
    )
    p = doc["predicted"]
    for key in ("peak_total_bytes", "peak_process_bytes", "saved_activation_bytes", "peak_by_category"):
        assert key in p
    assert doc["budget_bytes"] == 724 * 2**20 and doc["fits"] is True
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_estimate_measure_reports_both(cli_json):
    doc = cli_json("estimate", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--measure", "--method", "checkpoint")
    assert doc["methods"] == ["checkpoint"]
    h = doc["host_check"]
    assert h["host_measured_tensor_bytes"] == doc["predicted"]["peak_total_bytes"] == h["host_predicted_tensor_bytes"]
    assert h["host_measured_saved_activation_bytes"] == doc["predicted"]["saved_activation_bytes"]


def test_a_host_check_never_sets_a_device_prediction_beside_this_hosts_measurement(cli_json, cli):
    """plan --verify for a GTX 750 on this CPU host: the process figures are this host's, predicted and
    measured; the device's own process prediction stays in "predicted" (another machine)."""
    doc = cli_json("plan", "-d", "gtx750-1gb", "-m", "cifar_resnet20", "-b", "256", "-s", "32", "--verify")
    h = doc["host_check"]
    assert h["machine"] == "this host: peak RSS" and h["host_tensor_error"] == 0.0
    assert abs(h["host_process_error"]) < 0.05, h  # this host's framework, not the GPU's context
    assert h["host_predicted_process_bytes"] != doc["predicted"]["peak_process_bytes"]
    assert not {"peak_process_bytes", "peak_rss_bytes"} & set(h)  # no field a reader could pair with "predicted"
    code, out, _ = cli("estimate", "-d", "gtx750-1gb", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--measure")
    assert code == 0 and "this host (peak RSS):" in out and "predicted for this host" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["estimate", "-m", "resnet81"], "unknown model 'resnet81': did you mean resnet18"),
        (["estimate", "-m", "resnet18", "-b", "0"], "batch size must be a positive integer"),
        (["estimate", "-m", "vgg11_bn", "-s", "16", "-b", "2"], "too small for vgg11_bn's downsampling"),
        (
            ["estimate", "-m", "cifar_resnet8", "--measure", "--budget", "1KiB", "-s", "32"],
            "below the parameters' own size",
        ),
        (["estimate", "--device", "jetson-nanoo", "-s", "32"], "did you mean jetson-nano"),
        (["estimate", "-m", "cifar_resnet8", "--method", "compres:bits=2"], "unknown method"),
        (["estimate", "-m", "cifar_resnet8", "--method", "microbatch:micro_batches=x"], "must be int"),
        (["estimate", "-m", "cifar_resnet8", "--method", "precision:dtype=fp8"], "bf16 or fp16"),
        (["plan", "-m", "cifar_resnet8", "--allow", "everything"], "--allow: invalid choice: 'everything'"),
        (
            ["estimate", "-m", "cifar_resnet8", "--method", "precision:dtype=fp16", "--method", "step-in-backward"],
            "cannot run with fp16",
        ),
    ],
)
def test_bad_input_one_line_nonzero(cli, args, message):
    code, out, err = cli(*args)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1


def test_guard_oom_from_cli_is_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "edgetrain.cli.main", "estimate", "-m", "cifar_resnet8", "-b", "64", "-s", "64",
         "--measure", "--budget", "3MiB"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 3
    assert "out of memory under the budget guard" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plan_frontier_png_and_json(cli_json, tmp_path):
    """The figure draws what the JSON holds: the budget line at the budget, the chosen plan's star
    at its exact peak, the front's line through the front's points."""
    import matplotlib.pyplot as plt

    from edgetrain.cli.plan import frontier_figure
    from edgetrain.planning import Plan

    png = tmp_path / "frontier.png"
    doc = cli_json("plan", "-d", "gtx750-1gb", "-m", "cifar_resnet20", "-b", "512", "-s", "32", "--frontier", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and doc["frontier"]
    plan = Plan.from_dict(doc)  # what `plan --json` prints reads back as a plan
    fig = frontier_figure(plan)
    ax = fig.axes[0]
    budget = [ln for ln in ax.lines if ln.get_linestyle() == "--"][0]
    assert budget.get_xdata()[0] == pytest.approx(doc["request"]["budget_bytes"] / 2**20)
    chosen = [p for p in doc["frontier"] if p.get("chosen")][0]
    star = ax.collections[-1].get_offsets()[0]
    assert star[0] == pytest.approx(chosen["peak_device_bytes"] / 2**20) and star[1] == chosen["time_factor"]
    front = [ln for ln in ax.lines if ln.get_marker() == "o"][0]
    assert len(front.get_xdata()) == sum(p["front"] for p in doc["frontier"])
    plt.close(fig)
