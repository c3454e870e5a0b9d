"""A new user's first hour: nothing lost silently, nothing done silently, figures that compare
like with like. Each test failed before the change it guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetrain.memory.predict import Prediction
from edgetrain.planning import Plan, PlanRequest

TINY = ("--device", "cpu", "-m", "cifar_resnet8", "-s", "16", "-b", "128", "--epochs", "1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run, trained from a plan file that names its model, batch and size."""
    from edgetrain.cli.main import main

    d = tmp_path_factory.mktemp("finished")
    plan = Plan(PlanRequest("cifar_resnet8", (3, 16, 16), 128, device="cpu"))
    plan.save(d / "made.yaml")
    assert main(["fit", "--plan", str(d / "made.yaml"), "--epochs", "1", "--out", str(d / "run"), "--json"]) == 0
    return d / "run"


def test_fit_plan_takes_model_batch_and_size_from_the_file(finished):
    cfg = json.loads((finished / "report.json").read_text())["config"]
    assert (cfg["model"], cfg["batch_size"], cfg["input_size"], cfg["device"]) == ("cifar_resnet8", 128, 16, "cpu")


def test_fit_plan_refuses_another_batch(finished, cli, tmp_path):
    code, _, err = cli("fit", "--plan", str(finished.parent / "made.yaml"), "-b", "32", "--out", str(tmp_path / "r"))
    assert code == 2 and "was made for --batch-size 128, this run has 32" in err
    assert not (tmp_path / "r").exists()


def test_resume_of_a_finished_run_keeps_the_measured_figures(finished, cli):
    before = json.loads((finished / "report.json").read_text())
    assert before["measured_peak_bytes"] and before["median_step_seconds"]
    code, _, err = cli("fit", "--resume", str(finished))
    assert code == 0, err
    after = json.loads((finished / "report.json").read_text())
    assert after["measured_peak_bytes"] == before["measured_peak_bytes"]
    assert after["median_step_seconds"] == before["median_step_seconds"]


@pytest.mark.parametrize(("flag", "value"), [("--epochs", "3"), ("--lr", "0.5"), ("-b", "64")])
def test_resume_refuses_options_that_would_change_the_run(finished, cli, flag, value):
    code, _, err = cli("fit", "--resume", str(finished), flag, value)
    assert code == 2 and "--resume continues" in err and "cannot change" in err and "--init" in err


def test_fit_into_a_directory_of_the_users_own_files_is_refused(cli, tmp_path):
    (tmp_path / "plan.yaml").write_text("mine\n")
    (tmp_path / "report.json").write_text("{}\n")
    code, _, err = cli("fit", *TINY, "--out", str(tmp_path))
    assert code == 2 and "is not empty (plan.yaml, report.json) and holds no run" in err
    assert (tmp_path / "plan.yaml").read_text() == "mine\n" and (tmp_path / "report.json").read_text() == "{}\n"


def test_plan_suggests_a_complete_fit_command(cli, tmp_path):
    code, out, err = cli(
        "plan", "-d", "cpu", "-m", "cifar_resnet8", "-b", "8", "-s", "16", "--out", str(tmp_path / "p.yaml")
    )
    assert code == 0, err
    assert f"edgetrain fit --device cpu --model cifar_resnet8 -b 8 -s 16 --plan {tmp_path / 'p.yaml'}" in out


@pytest.mark.parametrize("verb", ["estimate", "fit"])
def test_a_method_with_no_eligible_layer_is_refused_or_skipped_on_request(cli, tmp_path, verb):
    args = [verb, "-m", "mobilenet_v2", "-s", "32", "-b", "8", "--method", "reversible"]
    args += ["--device", "cpu", "--out", str(tmp_path / "r")] if verb == "fit" else []
    code, _, err = cli(*args)
    assert code == 2 and "--method reversible changes nothing in mobilenet_v2" in err and "--skip-unused" in err
    if verb == "estimate":
        code, out, err = cli(*args, "--skip-unused")
        assert code == 0, err
        assert "--method reversible skipped: no eligible layer in mobilenet_v2" in err
        assert "plain" in out


def test_fit_refuses_an_input_below_the_models_downsampling(cli, tmp_path):
    code, _, err = cli("fit", "--device", "cpu", "-s", "4", "--out", str(tmp_path / "r"))
    assert code == 2 and "input size 4 is too small" in err and "-s 8" in err
    code, _, err = cli("estimate", "-m", "resnet18", "-s", "16", "-b", "2")
    assert code == 2 and "too small for resnet18's downsampling (32x): use -s 32" in err


def test_methods_shows_risk_as_a_number(cli, cli_json):
    rows = {r["name"]: r for r in cli_json("methods")}
    assert rows["compress"]["risk"] == 3 and all(isinstance(r["risk"], int) for r in rows.values())
    code, out, _ = cli("methods")
    assert code == 0 and "property object" not in out


def test_devices_names_close_matches_and_skips_one_bad_file(cli, tmp_path):
    code, out, err = cli("devices", "jetson-nan")
    assert code == 2 and "did you mean jetson-nano" in err and out == ""
    (tmp_path / "broken.yaml").write_text("name: [oops\n")
    code, out, err = cli("--profiles", str(tmp_path), "devices")
    assert code == 0 and "jetson-nano" in out and "broken.yaml" in err


def test_skipped_images_are_named_and_listed(cli, tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (16, 16), (i * 10, 0, 0) if c == "a" else (0, 0, i * 10)).save(
                tmp_path / "imgs" / c / f"{i}.png"
            )
    (tmp_path / "imgs" / "a" / "zz_broken.png").write_bytes(b"not a png")
    code, _, err = cli("fit", *TINY[:6], "-b", "8", "--epochs", "1", "--data", str(tmp_path / "imgs"),
                       "--out", str(tmp_path / "r"), "--json")  # fmt: skip
    assert code == 0, err
    assert "skipped 1 unreadable image files" in err and "zz_broken.png" in err
    listed = (tmp_path / "r" / "skipped_images.txt").read_text().split()
    assert listed == [str(tmp_path / "imgs" / "a" / "zz_broken.png")]


def test_plan_table_marks_unchecked_candidates():
    from edgetrain.cli.plan import _print

    predicted = Prediction(80 * 2**20, 70 * 2**20, 100 * 2**20, 0)
    plan = Plan(PlanRequest("m", device="cpu", budget_bytes=80 * 2**20), predicted=predicted, candidates=[
                    {"plan": "plain", "peak_device_bytes": 90 * 2**20, "fits": False},
                    {"plan": "checkpoint x2", "peak_device_bytes": 70 * 2**20, "fits": True, "chosen": True},
                    {"plan": "bf16 + checkpoint x7", "peak_device_bytes": None, "fits": None}])  # fmt: skip

    class Args:
        prefer, out = "speed", None

    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        _print(plan, None, Args())
    row = next(line for line in buf.getvalue().splitlines() if "checkpoint x7" in line)
    assert "not checked" in row and "True" not in row
