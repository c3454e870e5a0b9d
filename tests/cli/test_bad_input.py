"""Broken files and bad options for every verb: one line, a non-zero exit, never a traceback.

Runs in-process: any exception that escapes the CLI fails the test with its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetrain.models import create_model

BINARY = bytes(range(256)) * 4  # a foreign, non-text file


@pytest.fixture
def bad(tmp_path) -> Path:
    for name, data in {"foreign.yaml": BINARY, "empty.yaml": b"", "trunc.yaml": b"name: x\nkind: [",
                       "foreign.pt": BINARY, "empty.pt": b"", "trunc.pt": b"EDGETRAIN-CKPT1\nabc"}.items():  # fmt: skip
        (tmp_path / name).write_bytes(data)
    (tmp_path / "art").mkdir()
    (tmp_path / "art/training_model.onnx").write_bytes(BINARY)
    (tmp_path / "art/manifest.json").write_text("{")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/checkpoint.pt").write_bytes(BINARY)
    (tmp_path / "imgs/a").mkdir(parents=True)
    (tmp_path / "imgs/a/x.png").write_bytes(BINARY)
    (tmp_path / "empty").mkdir()
    torch.save(create_model("cifar_resnet20", 10).state_dict(), tmp_path / "resnet20.pt")  # another architecture
    return tmp_path


SMALL = ("-m", "cifar_resnet8", "-s", "16", "-b", "8")
CASES = [
    *[("estimate", "--device", f, *SMALL) for f in ("foreign.yaml", "empty.yaml", "trunc.yaml", "missing.yaml")],
    *[("plan", "--device", f, *SMALL) for f in ("foreign.yaml", "trunc.yaml")],
    *[("fit", "--device", "cpu", "--plan", f) for f in ("foreign.yaml", "empty.yaml", "trunc.yaml", "missing.yaml")],
    *[("fit", "--device", "cpu", "--init", f, *SMALL) for f in ("foreign.pt", "empty.pt", "trunc.pt", "missing.pt")],
    *[("export", "--checkpoint", f, "--out", "a") for f in ("foreign.pt", "empty.pt", "trunc.pt", "missing.pt")],
    ("export", "--run", "run", "--out", "a"),
    ("export", "--run", "empty", "--out", "a"),
    ("fit", "--resume", "run"),
    ("fit", "--resume", "empty"),
    ("finetune", "art", "--data", "digits", "--out", "ft"),
    ("finetune", "empty", "--data", "digits", "--out", "ft"),
    *[("fit", "--device", "cpu", "--data", d, *SMALL) for d in ("imgs", "empty", "missing", "digits:shift=x")],
    ("--profiles", "missing", "devices"),
    *[
        ("fit", "--device", "cpu", *SMALL, *opt)
        for opt in (
            ("-b", "0"),
            ("--lr", "-1"),
            ("--lr", "nan"),
            ("--epochs", "0"),
            ("-m", "nosuch"),
            ("--method", "nosuch"),
            ("--method", "compress:bits=3"),
        )
    ],  # fmt: skip
    *[("estimate", *SMALL, *opt) for opt in (("--method", "compress:group=7"), ("--method", "tucker2:rank=-1"))],
    ("export", "--model", "nosuch", "--out", "a"),
    # a checkpoint of another architecture, as it is and under a plan that changes the layers
    ("fit", "--device", "cpu", "--init", "resnet20.pt", *SMALL),
    ("fit", "--device", "cpu", "--init", "resnet20.pt", "--method", "tucker2:ratio=0.25", *SMALL),
    ("plan", *SMALL, "--allow", "everything"),
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a))
def test_broken_input_gets_one_line(bad, cli, monkeypatch, args):
    monkeypatch.chdir(bad)
    code, out, err = cli(*args)
    assert code != 0, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("edgetrain: ") or "error" in ln]
    assert len(lines) == 1 and "error" in lines[0], err


@pytest.mark.parametrize("opt", ["-b", "-s", "--epochs", "--lr", "--seed", "--ckpt-every"])
def test_options_of_the_wrong_type_are_refused_by_the_parser(cli, opt):
    code, _, err = cli("fit", opt, "x")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("edgetrain fit: error: argument") and "invalid" in err and "(see edgetrain fit --help)" in err
