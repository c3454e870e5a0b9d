"""The recipe's promises on real training: it recovers from a divergence, evaluates with statistics
that match the weights, reports per class, and says plainly when a model did not learn."""

from __future__ import annotations

import json
import math

import pytest
import torch

import edgetrain.train.recipe as recipe_mod
from edgetrain.train.evaluate import recalibrate_bn_
from edgetrain.train.recipe import Diverged, FitConfig, fit

# the injected steps skip optimizer.step(), so the scheduler warns that it stepped first
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")

SMALL = dict(model="cifar_resnet8", input_size=16, batch_size=32, quiet=True, device="cpu")


def _spiking_step(monkeypatch, at: set[int]):
    """train_step that, on the listed calls, wrecks the weights (NaN) and returns a NaN loss."""
    real, calls = recipe_mod.train_step, {"n": 0}

    def step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in at:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            return torch.tensor(float("nan"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(recipe_mod, "train_step", step)
    return calls


def test_a_divergence_goes_back_to_the_last_checkpoint_with_half_the_rate(monkeypatch, tmp_path, capsys):
    _spiking_step(monkeypatch, {10})
    cfg = FitConfig(epochs=1, ckpt_every=4, out=str(tmp_path / "r"), **{**SMALL, "quiet": False})
    r = fit(cfg)
    err = capsys.readouterr().err + capsys.readouterr().out
    line = next(ln for ln in err.splitlines() if "diverged" in ln)
    assert "back to step 8" in line and "halved to" in line
    assert r["recoveries"] == 1 and r["config"]["lr"] == pytest.approx(0.1 * 32 / 256 / 2)
    assert r["steps"] == 45 and math.isfinite(r["test_loss"]) and r["test_accuracy"] > 0.5
    weights = torch.load(tmp_path / "r/model.pt")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_run_that_keeps_diverging_stops_with_one_line(monkeypatch, tmp_path):
    _spiking_step(monkeypatch, set(range(1, 1000)))
    with pytest.raises(Diverged, match=r"after 3 recoveries .* lower --lr") as e:
        fit(FitConfig(epochs=1, out=str(tmp_path / "r"), **SMALL))
    assert "\n" not in str(e.value)


def test_a_loss_spike_above_chance_is_a_divergence(monkeypatch, tmp_path):
    real, calls = recipe_mod.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * 50 if calls["n"] == 30 else loss  # finite, but far above the running level

    monkeypatch.setattr(recipe_mod, "train_step", step)
    r = fit(FitConfig(epochs=1, ckpt_every=10, out=str(tmp_path / "r"), **SMALL))
    assert r["recoveries"] == 1


def test_saved_weights_carry_statistics_that_match_them(tmp_path):
    """model.pt's BatchNorm statistics are the precise ones: re-estimating them changes nothing."""
    r = fit(FitConfig(epochs=1, out=str(tmp_path / "r"), **SMALL))
    from edgetrain.models import create_model
    from edgetrain.train.data import load_data
    from edgetrain.train.evaluate import precise_bn_sample

    model = create_model("cifar_resnet8", 10)
    model.load_state_dict(torch.load(tmp_path / "r/model.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn_(model, precise_bn_sample(load_data("digits", 16).train, 0), 32)
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), before[k].float(), atol=1e-6), k
    from edgetrain.train import checkpoint as ckpt

    exported = ckpt.load(tmp_path / "r/checkpoint.pt")["model"]  # what `edgetrain export --run` reads
    assert all(torch.equal(exported[k], v) for k, v in before.items() if "running" in k)
    assert r["test_accuracy"] > 0.5  # one epoch: eval mode no longer reads near chance (was 10.6 %)


def test_report_has_per_class_accuracy_and_a_confusion_png(tmp_path):
    fit(FitConfig(epochs=1, max_steps=3, out=str(tmp_path / "r"), **SMALL))
    rep = json.loads((tmp_path / "r/report.json").read_text())
    conf = rep["confusion"]
    assert len(conf) == 10 and sum(map(sum, conf)) == 359  # the digits test split
    assert rep["per_class_accuracy"][3] == pytest.approx(conf[3][3] / sum(conf[3]))
    assert (tmp_path / "r/confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_says_when_the_model_did_not_learn(cli, tmp_path):
    code, out, err = cli("fit", "--device", "cpu", "-m", "cifar_resnet8", "-s", "16", "--epochs", "1",
                         "--lr", "1e-7", "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 0
    line = next(ln for ln in err.splitlines() if "did not learn" in ln)
    assert "near chance" in line and "--lr (now 1e-07)" in line


def test_a_divergence_back_to_step_0_keeps_the_measured_peak(monkeypatch, tmp_path):
    """The checkpoint of step 0 holds no measured peak; the guarded steps before the divergence did."""
    _spiking_step(monkeypatch, {4})
    r = fit(FitConfig(epochs=1, ckpt_every=40, out=str(tmp_path / "r"), **SMALL))
    assert r["recoveries"] == 1 and r["measured_peak_bytes"] and r["measured_peak_bytes"] > 0
