"""Low-rank methods from the CLI: listed, estimated, planned, fitted (converted and resumed)."""

from __future__ import annotations

import json

import pytest

from edgetrain.train.recipe import FitConfig, fit

SMALL = dict(model="cifar_resnet8", batch_size=32, input_size=16, epochs=1)


def test_methods_lists_the_low_rank_ones(cli_json):
    names = {m["name"]: m for m in cli_json("methods")}
    assert {"tucker2", "cp", "partial"} <= set(names) and "cp-refused" not in names
    assert names["tucker2"]["options"]["reg"] == "none" and names["cp"]["options"]["refuse"] is False


def test_the_old_name_cp_refused_still_parses_as_cp_refuse_true():
    from edgetrain.methods.base import parse_spec

    assert parse_spec("cp-refused:iters=2") == parse_spec("cp:refuse=true,iters=2")
    assert parse_spec("cp-refused") == parse_spec("cp:refuse=true")


def test_estimate_shows_the_smaller_parameters_and_the_refused_bytes(cli_json):
    base = ["estimate", "-m", "cifar_resnet20", "-b", "16", "-s", "32"]
    plain, low = cli_json(*base), cli_json(*base, "--method", "tucker2:ratio=0.25")
    cp, refused = cli_json(*base, "--method", "cp:iters=2"), cli_json(*base, "--method", "cp:refuse=true,iters=2")
    params = [d["predicted"]["peak_by_category"]["parameters"] for d in (plain, low)]
    assert params[1] < 0.5 * params[0]
    assert refused["predicted"]["saved_activation_bytes"] < cp["predicted"]["saved_activation_bytes"]


def test_estimate_measure_agrees_for_partial_update(cli_json):
    doc = cli_json("estimate", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--measure",
                   "--method", "tucker2", "--method", "partial:factor=last")  # fmt: skip
    assert doc["host_check"]["host_measured_tensor_bytes"] == doc["predicted"]["peak_total_bytes"]


def test_plan_with_a_low_rank_method(cli_json, tmp_path):
    doc = cli_json("plan", "-d", "cpu", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--method", "tucker2",
                   "--out", str(tmp_path / "p.yaml"))  # fmt: skip
    assert doc["choices"]["methods"][0] == "tucker2" and doc["risk"] >= 5
    assert doc["candidates"][0]["plan"] == "tucker2" and "tucker2 alone" in doc["reasons"][0]
    small = {**SMALL, "batch_size": 8, "input_size": 32}  # what the plan was made for
    r = fit(FitConfig(device="cpu", plan=str(tmp_path / "p.yaml"), out=str(tmp_path / "run"), max_steps=1, **small))
    assert r["methods"][0] == "tucker2"


def test_plan_plot_with_a_low_rank_method(cli, tmp_path):
    png = tmp_path / "plan.png"
    code, _, err = cli("plan", "-d", "cpu", "-m", "cifar_resnet8", "-b", "8", "-s", "32", "--method", "tucker2",
                       "--plot", str(png))  # fmt: skip
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["estimate", "-m", "cifar_resnet8", "--method", "tucker2:ratio=0"], "ratio must be in (0, 1]"),
        (["estimate", "-m", "cifar_resnet8", "--method", "partial"], "no factorized layer"),
        (["plan", "-m", "cifar_resnet8", "-d", "cpu", "--method", "checkpoint"], "give only low-rank methods"),
        (["fit", "--init", "nowhere.pt", "--method", "tucker2"], "weights file nowhere.pt not found"),
    ],
)
def test_bad_low_rank_input_is_one_line(cli, args, message):
    code, _, err = cli(*args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1


def test_fit_converts_trained_weights_reports_and_resumes(tmp_path):
    dense = fit(FitConfig(device="cpu", out=str(tmp_path / "dense"), max_steps=6, **SMALL))
    assert dense["lowrank"] is None
    cfg = dict(device="cpu", init=str(tmp_path / "dense" / "model.pt"), ckpt_every=2,
               methods=["tucker2:rank=1000", "partial:factor=last"], **SMALL)  # fmt: skip
    run = tmp_path / "low"
    first = fit(FitConfig(out=str(run), max_steps=3, **cfg))
    low = first["lowrank"]
    assert low["logits_error"] <= 1e-4 and low["top1_agreement"] == 1.0  # full rank: the same function
    assert first["trainable_parameters"] < first["parameters"]
    done = fit(FitConfig(out=str(run), **cfg), resume=True)
    assert done["steps"] > 3 and json.loads((run / "report.json").read_text())["plan"].startswith("tucker2")


def test_energy_ranks_survive_resume_and_export(tmp_path, cli):
    """Ranks read off trained weights are not those of a fresh model: the checkpoint's win."""
    fit(FitConfig(device="cpu", out=str(tmp_path / "dense"), max_steps=4, **SMALL))
    cfg = dict(
        device="cpu", init=str(tmp_path / "dense" / "model.pt"), ckpt_every=2, methods=["tucker2:energy=0.6"], **SMALL
    )
    run = tmp_path / "low"
    fit(FitConfig(out=str(run), max_steps=2, **cfg))
    done = fit(FitConfig(out=str(run), **cfg), resume=True)
    assert done["steps"] > 2
    code, _, err = cli("export", "--run", str(run), "--out", str(tmp_path / "art"))
    assert code == 0, err
