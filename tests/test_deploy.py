"""Images and deployment: hadolint, the dry-run steps per profile, the entrypoint, pre-flight errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.deploy import DeployError, Step, execute, plan_steps, preflight, target_for
from edgetrain.devices.store import get_device, list_devices
from edgetrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def _hadolint() -> str:
    return str(Path(sys.executable).with_name("hadolint"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_and_every_ignore_is_justified(dockerfile):
    proc = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        for rule in re.findall(r"DL\d{4}", line) if "hadolint ignore" in line else []:
            after = "\n".join(lines[i + 1 : i + 25])
            assert f"{rule}:" in after or f"{rule}/" in after or f"{rule}," in after, f"{rule} ignored without a reason"


def test_three_dockerfiles_and_a_dockerignore():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.jetson", "Dockerfile.runtime"}
    assert ".venv" in (ROOT / ".dockerignore").read_text()


@pytest.mark.parametrize("name", list_devices())
def test_dry_run_steps_for_every_profile(name, cli_json):
    profile = get_device(name)
    doc = cli_json("deploy", "--device", name, "--host", "me@board", "--dry-run")
    t, steps = doc["target"], {s["name"]: s["argv"] for s in doc["steps"]}
    assert list(steps) == ["build", "ship", "prepare", "start", "tail"]
    start = steps["start"][-1]
    if profile.kind == "jetson":
        assert t["platform"] == "linux/arm64" and steps["build"][:5] == [
            "docker",
            "buildx",
            "build",
            "--platform",
            "linux/arm64",
        ]
        assert "--runtime=nvidia" in start and "--memory=" in start
    else:
        assert t["platform"] == "linux/amd64" and steps["build"][:2] == ["docker", "build"]
        assert "--runtime=nvidia" not in start
    assert t["dockerfile"] == "docker/Dockerfile.runtime" and "finetune-default" in start
    assert "docker load" in steps["ship"][-1] and "docker logs -f" in steps["tail"][-1]


def test_full_images_follow_jetpack_and_gpu():
    orin = target_for(get_device("jetson-orin-nano"), "full")
    assert orin.dockerfile == "docker/Dockerfile.jetson" and "r35" in orin.build_args["BASE_IMAGE"]
    assert "pytorch:24" in target_for(get_device("jetson-orin-nano"), "full", jetpack=6).build_args["BASE_IMAGE"]
    gpu = target_for(get_device("gtx750-1gb"), "full")
    assert "--gpus=all" in gpu.run_flags and not any(f.startswith("--memory") for f in gpu.run_flags)
    with pytest.raises(ConfigError, match="JetPack 4.*use --image runtime"):
        target_for(get_device("jetson-nano"), "full")
    steps = plan_steps(orin, "me@b", artifacts="art", registry="reg:5000")
    assert "--push" in steps[0].argv and "docker pull reg:5000/edgetrain:full-r35" in steps[1].argv[-1]
    assert [s.name for s in steps] == ["build", "ship", "prepare", "copy", "start", "tail"]


def _fake_bin(tmp_path: Path, **scripts: str) -> str:
    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/bin/sh\n" + body + "\n")
        (d / name).chmod(0o755)
    return str(d)


SSH_OK = 'echo aarch64; echo "# R35 (release), REVISION: 4.1"; echo "/dev/root 30000000 1 20000000 1% /"'


@pytest.mark.parametrize("scripts,message", [
    ({}, "docker is not installed"),
    ({"docker": 'if [ "$1" = buildx ]; then exit 1; fi'}, "docker buildx is missing"),
    ({"docker": "exit 0", "ssh": 'echo "ssh: connect to host board port 22: Connection refused" >&2; exit 255'},
     "cannot reach me@board over ssh (ssh: connect to host board port 22: Connection refused)"),
    ({"docker": "exit 0", "ssh": 'echo x86_64; echo "/dev/root 30000000 1 20000000 1% /"'}, "me@board is x86_64"),
    ({"docker": "exit 0", "ssh": 'echo aarch64; echo "# R36 (release)"; echo "/dev/root 3 1 20000000 1% /"'},
     "runs L4T R36 (JetPack 6), the image is for JetPack 5: pass --jetpack 6"),
    ({"docker": "exit 0", "ssh": 'echo aarch64; echo "# R35 (release)"; echo "/dev/root 3 1 100000 1% /"'},
     "GiB free, the runtime image needs"),
])  # fmt: skip
def test_preflight_failures_are_clear(tmp_path, monkeypatch, scripts, message):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, **scripts) + os.pathsep + "/usr/bin/nonexistent")
    target = target_for(get_device("jetson-xavier-nx"), "runtime")
    with pytest.raises(DeployError, match=re.escape(message)):
        preflight(target, "me@board")


def test_preflight_passes_and_cli_reports_the_error_line(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, docker="exit 0", ssh=SSH_OK))
    found = preflight(target_for(get_device("jetson-xavier-nx"), "runtime"), "me@board")
    assert found["arch"] == "aarch64" and found["l4t"] == "R35"
    monkeypatch.setenv("PATH", _fake_bin(tmp_path / "x", ssh="exit 255"))
    code, _, err = cli("deploy", "--device", "jetson-xavier-nx", "--host", "me@board")
    assert code == 2 and err.count("\n") == 1 and "docker is not installed" in err


def test_execute_stops_at_the_first_failure_with_its_output(tmp_path):
    steps = [Step("one", ("sh", "-c", "echo ok")), Step("two", ("sh", "-c", "echo boom >&2; exit 3")),
             Step("three", ("sh", "-c", f"touch {tmp_path / 'ran'}"))]  # fmt: skip
    with pytest.raises(DeployError, match=r"step 'two' failed \(exit 3\)[\s\S]*boom"):
        execute(steps, tmp_path, echo=lambda s: None)
    assert not (tmp_path / "ran").exists()


def _entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "EDGETRAIN_BIN": f"{sys.executable} -m edgetrain.cli.main", "EDGETRAIN_PYTHON": sys.executable,
            "EDGETRAIN_WORK": str(tmp_path), **env}  # fmt: skip
    return subprocess.run([str(ROOT / "deploy" / "entrypoint.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_entrypoint_fits_the_embedded_default_on_this_host(tmp_path):
    proc = _entrypoint(tmp_path, EDGETRAIN_EPOCHS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout and (tmp_path / "out" / "report.json").is_file()
    again = _entrypoint(tmp_path, EDGETRAIN_EPOCHS="1")  # a restart resumes the finished run
    assert again.returncode == 0, again.stderr[-2000:]


def test_entrypoint_finetune_default_needs_artifacts(tmp_path):
    proc = _entrypoint(tmp_path, "finetune-default")
    assert proc.returncode == 2 and "no artifacts in" in proc.stderr


def test_a_board_deployed_into_a_fleet_starts_a_supernode_on_the_host_network():
    nano = target_for(get_device("jetson-nano"), "runtime")
    start = next(s for s in plan_steps(nano, "me@nano", "art", superlink="10.0.0.1:9092") if s.name == "start")
    assert "--network=host --env=EDGETRAIN_SUPERLINK=10.0.0.1:9092" in start.shell()
    assert start.shell().rstrip("'").endswith("edgetrain:runtime-arm64 fleet-join")
    with pytest.raises(ConfigError, match="--superlink with the runtime image trains exported artifacts"):
        plan_steps(nano, "me@nano", None, superlink="10.0.0.1:9092")


def test_entrypoint_fleet_join_says_in_one_line_when_the_server_cannot_be_reached(tmp_path):
    proc = _entrypoint(tmp_path, "fleet-join", EDGETRAIN_SUPERLINK=f"127.0.0.1:{_closed_port()}", EDGETRAIN_DEVICE="cpu",
                       EDGETRAIN_PARTITION="0/4", EDGETRAIN_MAX_WAIT="3")  # fmt: skip
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("edgetrain fleet: error: could not reach the SuperLink at")
    assert (tmp_path / "out" / "fleet-node.log").is_file()
    assert _entrypoint(tmp_path, "fleet-join").stderr.strip() == (
        "edgetrain-entrypoint: set EDGETRAIN_SUPERLINK=HOST:PORT (where `edgetrain fleet serve` runs)"
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
