"""The README walked as a new user would: every command it shows parses, the figures it quotes
match the bench files that produce them (within the rounding the README uses), the figures
cheap to recompute are recomputed, and its commands run end to end on small shapes (30 s)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgetrain.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """Every `edgetrain ...` line inside a fenced block, comments dropped (not the synopsis
    lines with [optional] parts)."""
    out, fenced = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        line = line.removeprefix("$ ").split("  #")[0].strip()
        if fenced and line.startswith("edgetrain ") and "[" not in line:
            out.append(line)
    return out


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"README command does not parse (exit {e.code}): {command}")


def _num(text: str, pattern: str, where: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{where}: no match for {pattern!r}"
    return float(m.group(1).replace(",", ""))


RECIPE = r"make run \(digits\)\s+precise\s+plain\s+([\d.]+)%\s+([\d.]+)%\s+\d+\s+\w+\s+(\d+)"
FIT_BUDGET = r"gtx750-1gb\s+.+?\s+([\d.]+)%"
# (what, README pattern, bench file, bench pattern, tolerance: the README's rounding)
QUOTED = [
    ("make run: final accuracy", r"reaches \*\*([\d.]+) % test accuracy", "recipe.txt",
     RECIPE.replace(r"([\d.]+)%\s+([\d.]+)%", r"[\d.]+%\s+([\d.]+)%"), 0.05),
    ("make run: epoch 1", r"\(([\d.]+) % after the first epoch", "recipe.txt", RECIPE, 0.005),
    ("runtime: before fine-tuning", r"\*\*([\d.]+) % →", "runtime.txt", r"before fine-tuning:\s+([\d.]+)%", 0.005),
    ("runtime: after fine-tuning", r"→\s+([\d.]+) %\*\*", "runtime.txt", r"after 3 epochs on board:\s+([\d.]+)%", 0.005),
    ("runtime: peak RSS", r"runtime\s+\*\*(\d+) MiB\*\*", "runtime.txt", r"no torch\):\s+(\d+) MiB", 0.5),
    ("runtime: PyTorch RSS", r"never imported\), PyTorch (\d+) MiB", "runtime.txt", r"PyTorch:\s+(\d+) MiB", 0.5),
    ("runtime: RSS, torch installed", r"\((\d+) MiB with torch installed", "runtime.txt", r"not imported\):\s+(\d+) MiB", 0.5),
    ("fit budget: accuracy", r"It reaches \*\*([\d.]+) %\*\*", "fit_budget.txt", FIT_BUDGET, 0.005),
    ("fit budget: device level", r"fit picks `[^`]+`: (\d+) MiB at the device level", "fit_budget.txt",
     FIT_BUDGET.replace(r"([\d.]+)%", r"[\d.]+%\s+[\d.]+\s+[\d.]+\s+([\d.]+)"), 0.5),
    ("fit budget: measured", r"MiB of tensors\s+predicted and ([\d.]+) MiB measured", "fit_budget.txt",
     FIT_BUDGET.replace(r"([\d.]+)%", r"[\d.]+%\s+[\d.]+\s+([\d.]+)"), 0.05),
    ("memory grid: process error, max", r"has a median of [\d.]+ % and a maximum of ([\d.]+) %", "memory_grid.txt",
     r"process_err: median \|error\| [\d.]+%, max \|error\| ([\d.]+)%", 0.005),
    ("memory grid: process error, median", r"has a median of ([\d.]+) %", "memory_grid.txt",
     r"process_err: median \|error\| ([\d.]+)%", 0.005),
    ("levers: the 8.7x plan on digits", r"its levers reach ([\d.]+) % against plain", "levers.txt",
     r"checkpoint \+ compress:bits=8\n\s+lossy\s+\d+\s+([\d.]+)%", 0.05),
    ("levers: one-image micro-batches", r"micro-batch ×64 \(1 image\) \| lossy \| \d \| ([\d.]+) %", "levers.txt",
     r"microbatch:micro_batches=64\s+lossy\s+\d+\s+([\d.]+)%", 0.005),
    ("re-fused CP layers on vgg11", r"makes its layers ([\d.]+)× faster than unfused", "lowrank.txt",
     r"cp re-fused \(depthwise recomputed\)\s+124\.20M[^\n]*\s([\d.]+)\n", 0.005),
]  # fmt: skip


@pytest.mark.parametrize(("what", "readme", "bench", "pattern", "tol"), QUOTED, ids=[q[0] for q in QUOTED])
def test_quoted_figures_match_their_bench_files(what, readme, bench, pattern, tol):
    quoted = _num(README, readme, "README.md")
    measured = _num((ROOT / "bench" / bench).read_text(), pattern, f"bench/{bench}")
    assert abs(quoted - measured) <= tol, f"{what}: README says {quoted}, bench/{bench} says {measured}"


def test_make_run_time_matches_the_bench():
    quoted = _num(README, r"`make run` finishes in about (\d+) s", "README.md")
    measured = float(re.search(RECIPE, (ROOT / "bench/recipe.txt").read_text()).group(3))
    assert 0.7 * measured <= quoted <= 1.3 * measured, f"README says about {quoted} s, the bench took {measured} s"


def test_device_table_is_what_devices_prints():
    block = README.split("$ edgetrain devices", 1)[1].split("```", 1)[0]
    got = {p.name: p for p in _profiles()}
    for line in block.strip().splitlines()[1:]:
        name, kind, _total, _, usable_mib = line.split()[:5]
        if name == "cpu":
            continue  # the host's own memory
        assert name in got and got[name].kind == kind
        assert float(usable_mib.replace(",", "")) == pytest.approx(got[name].usable_memory_bytes / 2**20, abs=0.05)
        ref = line.split("spec", 1)[1].strip()
        assert got[name].reference.startswith(ref), f"{name}: README cites {ref!r}, the profile {got[name].reference!r}"


def _profiles():
    from edgetrain.devices.store import get_device, list_devices

    return [get_device(n) for n in list_devices()]


def test_recomputed_prediction_figures():
    """Figures the README quotes from a prediction: recomputed (fake tensors, seconds)."""
    from edgetrain.models import create_model
    from edgetrain.planning.estimate import estimate

    gib = _num(README, r"the predicted peak is ([\d.]+) GB", "README.md")
    got = estimate(create_model("resnet18"), (3, 224, 224), 128).predicted.peak_total_bytes / 2**30
    assert abs(gib - got) <= 0.05, f"README: resnet18 b128 224 px peak {gib} GB, predicted {got:.2f} GiB"
    tensors = _num(README, r"the step needs (\d+) MiB of tensors", "README.md")
    device = _num(README, r"MiB of tensors, (\d+) MiB at the device level", "README.md")
    e = estimate(create_model("mobilenet_v2"), (3, 64, 64), 128, device="gtx750-1gb")
    assert abs(tensors - e.predicted.peak_total_bytes / 2**20) <= 0.5
    assert abs(device - e.predicted.peak_device_bytes / 2**20) <= 0.5


SMALL = {"-s": "16", "--input-size": "16", "-b": "64", "--batch-size": "64", "--epochs": "1", "-m": "cifar_resnet8",
         "--model": "cifar_resnet8", "--trainable": "fc", "--rounds": "1", "--clients": "2"}  # fmt: skip


def _small(command: str, tmp: Path) -> list[str]:
    """The command on small shapes, with its relative paths under `tmp`."""
    args, out = shlex.split(command)[1:], []
    it = iter(args)
    for a in it:
        if a in SMALL:
            next(it)
            out += [a, SMALL[a]]
        elif a.startswith(("runs/", "./", "art", "ft", "plan.")) or a in ("art", "ft"):
            out.append(str(tmp / a))
        else:
            out.append(a)
    if out[0] == "fit" and "--out" not in out and "--resume" not in out:
        out += ["--out", str(tmp / "runs" / f"walk{len(list(tmp.glob('runs/walk*')))}")]
    if out[0] == "fit" and "-m" not in out and "--model" not in out and "--resume" not in out:
        out += ["-m", "cifar_resnet8", "-s", "16", "--epochs", "1"]
    if out[0] == "fleet" and "--out" not in out:
        out += ["--out", str(tmp / "fleet")]
    if out[0] == "fit" and "--device" in out:  # train on the host; the plan is still made for the device
        out[out.index("--device") + 1] = "cpu"
    return out


def test_the_readme_walk_runs_on_small_shapes(cli, tmp_path):
    """Every README command in order, on small shapes: exit 0 (--measure and --verify skipped)."""
    from edgetrain.train.data import write_sample_photos

    write_sample_photos(tmp_path / "my-images", patch=16, stride=64)
    (tmp_path / "runs").mkdir()
    ran = 0
    for command in readme_commands():
        args = _small(command, tmp_path)
        if args[0] in ("profile",) or "--measure" in args or "--verify" in args or "--init" in args:
            continue
        if args[:2] in (["fleet", "serve"], ["fleet", "join"]):  # real processes: tests/fleet/test_processes.py
            continue
        code, _, err = cli(*args)
        assert code == 0, f"{command} -> {' '.join(args)}: {err[-500:]}"
        ran += 1
    assert ran >= 8
