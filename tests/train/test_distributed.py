"""`fit --nproc`: DDP under torchrun. Two processes at B/2 take the same steps as one at B (no
BatchNorm); rank 0 alone writes; a rank killed with -9 stops the job and --resume continues it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from edgetrain.cli.main import main
from edgetrain.models import register_model
from edgetrain.train.recipe import FitConfig, fit


@register_model
def ddp_test_net(num_classes: int = 10) -> nn.Module:
    """No BatchNorm, no dropout: the same function whatever the batch is split into."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))  # fmt: skip


def _cfg(out, model: str = "ddp_test_net", **kw) -> FitConfig:
    return FitConfig(device="cpu", model=model, batch_size=32, input_size=16, epochs=1, max_steps=6,
                     ckpt_every=3, out=str(out), quiet=True, **kw)  # fmt: skip


def _rank(rank: int, port: int, out: str, methods: list[str], model: str = "ddp_test_net") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    fit(_cfg(out, methods=methods, model=model))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("methods", [[], ["microbatch:micro_batches=2"]])
def test_two_processes_at_half_the_batch_take_the_same_steps_as_one(tmp_path, methods):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    fit(_cfg(one, methods=methods))
    mp.spawn(_rank, args=(_free_port(), str(two), methods), nprocs=2, join=True)
    a, b = torch.load(one / "model.pt"), torch.load(two / "model.pt")
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    la, lb = _losses(one), _losses(two)  # every rank logs the batch's loss (the mean over ranks)
    assert len(la) == len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5
    ra, rb = json.loads((one / "report.json").read_text()), json.loads((two / "report.json").read_text())
    assert rb["plan"] == ra["plan"]


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "model, methods",
    [("cifar_resnet8", ["checkpoint"]), ("cifar_resnet8", ["compress:bits=8"]), ("cifar_resnet20", ["reversible"])],
)
def test_checkpointing_compression_and_reversible_blocks_train_under_ddp(tmp_path, model, methods):
    """Their custom backward runs inside DDP's hooks: every parameter's gradient is reduced each
    step (DDP raises on the next step otherwise), the ranks finish in step, and rank 0 writes the
    run (BatchNorm here: per-rank statistics, so no equality with one process)."""
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), methods, model), nprocs=2, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 6 and report["methods"] == methods
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "model.pt").values() if v.is_floating_point())


def test_a_method_ddp_cannot_follow_is_refused_in_one_line(tmp_path, capsys):
    code = main(["fit", "--device", "cpu", "--model", "cifar_resnet8", "--nproc", "2", "--batch-size", "32",
                 "--input-size", "16", "--method", "step-in-backward", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (
        "edgetrain fit: error: method step-in-backward cannot run under DDP (--nproc 2): "
        "its backward updates or recomputes outside the gradient hooks DDP averages with; drop it or use --nproc 1"
    )


@pytest.mark.parametrize("argv, line", [
    (["--nproc", "64"], "--nproc 64 is more than this machine can run"),
    (["--nproc", "2", "--batch-size", "33"], "--batch-size 33 does not split over --nproc 2 processes"),
])  # fmt: skip
def test_bad_process_counts_are_one_line(tmp_path, capsys, argv, line):
    code = main(["fit", "--device", "cpu", "--model", "cifar_resnet8", "--input-size", "16", "--out",
                 str(tmp_path / "r"), *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and line in err


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "edgetrain.cli.main" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_rank_killed_with_9_stops_the_job_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edgetrain.cli.main", "fit", "--device", "cpu", "--model", "cifar_resnet8", "--nproc",
            "2", "--batch-size", "64", "--epochs", "3", "--ckpt-every", "5", "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file() or _steps(out) < 8:
        assert job.poll() is None, job.communicate()
        time.sleep(0.2)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    _, err = job.communicate(timeout=240)
    assert job.returncode != 0
    assert f"a rank failed (exit {job.returncode}); the last checkpoint is kept: continue with --resume" in err
    resumed = subprocess.run([*argv[:3], "fit", "--resume", str(out), "--nproc", "2"], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 * 23  # 1,437 digits at 64 a batch: 23 steps an epoch, none lost or repeated


def _steps(out) -> int:
    try:
        return len([1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line])
    except OSError:
        return 0
