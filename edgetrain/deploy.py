"""`edgetrain deploy`: build the image for a board, ship it, copy artifacts, start the run, tail it.

One list of steps serves both `--dry-run` (printed) and the real run (executed in order, stopping
at the first failure with that step's output). Every step can run again: the image build is
cached, loading an image again replaces it, the copy overwrites, and the run's container is
removed before it starts again (the run itself resumes from its checkpoint in the work dir).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgetrain.devices.profile import DeviceProfile
from edgetrain.errors import ConfigError, EdgetrainError

# JetPack major -> (L4T major, base image of the full Jetson image)
JETPACK = {
    4: ("R32", None),  # Python 3.6 and torch <= 1.10: the full image cannot run there
    5: ("R35", "nvcr.io/nvidia/l4t-pytorch:r35.2.1-pth2.0-py3"),
    6: ("R36", "nvcr.io/nvidia/pytorch:24.06-py3-igpu"),
}
L4T_TO_JETPACK = {"R32": 4, "R35": 5, "R36": 6}
IMAGE_GIB = {"runtime": 1.5, "full": 9.0}  # disk the board needs for the image (loaded) and a run
REMOTE_DIR = "edgetrain"  # under the remote user's home
CONTAINER = "edgetrain-run"


class DeployError(EdgetrainError):
    """A pre-flight check or a deployment step failed."""


@dataclass(frozen=True)
class Target:
    """What to build for a device: platform, Dockerfile, build args, tag and `docker run` flags."""

    device: str
    image: str  # runtime | full
    platform: str
    dockerfile: str
    tag: str
    build_args: dict[str, str] = field(default_factory=dict)
    run_flags: tuple[str, ...] = ()
    jetpack: int | None = None


def jetpack_major(profile: DeviceProfile, override: int | None = None) -> int | None:
    """The board's JetPack major: `override`, else the first number of the profile's `software.jetpack`."""
    if override is not None:
        return override
    m = re.search(r"\d+", str(profile.software.get("jetpack", "")))
    return int(m.group()) if m else None


def target_for(profile: DeviceProfile, image: str = "runtime", jetpack: int | None = None) -> Target:
    if image not in IMAGE_GIB:
        raise ConfigError(f"--image must be runtime or full, got {image!r}")
    flags: tuple[str, ...] = (f"--env=EDGETRAIN_DEVICE={profile.name}",)
    if profile.kind != "cuda":  # one memory for CPU and GPU: cap the container at what training may use
        mem_mib = (profile.usable_memory_bytes + profile.reserved_bytes.get("framework", 0)) // 2**20
        flags = (f"--memory={mem_mib}m", *flags)
    if profile.kind == "jetson":
        jp = jetpack_major(profile, jetpack)
        if jp not in JETPACK:
            raise ConfigError(
                f"{profile.name}: JetPack {jp} is not one edgetrain builds for (4, 5 or 6): pass --jetpack N"
            )
        l4t, base = JETPACK[jp]
        flags = ("--runtime=nvidia", *flags)
        if image == "full":
            if base is None:
                raise ConfigError(
                    f"{profile.name} runs JetPack {jp} (Python 3.6, torch <= 1.10), too old for the full image: "
                    "use --image runtime (fine-tuning with onnxruntime-training)"
                )
            return Target(profile.name, image, "linux/arm64", "docker/Dockerfile.jetson", f"edgetrain:full-{l4t.lower()}",
                          {"BASE_IMAGE": base}, flags, jp)  # fmt: skip
        return Target(
            profile.name, image, "linux/arm64", "docker/Dockerfile.runtime", "edgetrain:runtime-arm64", {}, flags, jp
        )
    if profile.kind == "cuda" and image == "full":
        flags = ("--gpus=all", *flags)
    dockerfile = "docker/Dockerfile" if image == "full" else "docker/Dockerfile.runtime"
    return Target(profile.name, image, "linux/amd64", dockerfile, f"edgetrain:{image}-amd64", {}, flags)


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]

    def shell(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)


def _ssh(host: str, command: str) -> tuple[str, ...]:
    return ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, command)


def plan_steps(target: Target, host: str, artifacts: str | None = None, data: str = "digits",
               registry: str | None = None, host_platform: str = "linux/amd64",
               superlink: str | None = None) -> list[Step]:  # fmt: skip
    """The deployment, step by step, as argv lists (what --dry-run prints and the real run executes).
    With `superlink`, the board joins that fleet (a SuperNode) instead of fine-tuning alone."""
    build = ["docker", "buildx", "build", "--platform", target.platform, "-f", target.dockerfile, "-t", target.tag]
    if target.platform == host_platform and not registry:
        build = ["docker", "build", "-f", target.dockerfile, "-t", target.tag]
    for k, v in target.build_args.items():
        build += ["--build-arg", f"{k}={v}"]
    build += ["--push"] if registry else (["--load"] if build[1] == "buildx" else [])
    tag = f"{registry.rstrip('/')}/{target.tag}" if registry else target.tag
    if registry:
        build[build.index(target.tag)] = tag
    steps = [Step("build", (*build, "."))]
    if registry:
        steps.append(Step("ship", _ssh(host, f"docker pull {shlex.quote(tag)}")))
    else:
        steps.append(Step("ship", ("sh", "-c", f"docker save {shlex.quote(tag)} | gzip | "
                                               f"ssh -o BatchMode=yes {shlex.quote(host)} 'gunzip | docker load'")))  # fmt: skip
    steps.append(Step("prepare", _ssh(host, f"mkdir -p {REMOTE_DIR}/artifacts {REMOTE_DIR}/out")))
    if artifacts:
        steps.append(Step("copy", ("scp", "-q", "-r", "-o", "BatchMode=yes", f"{artifacts.rstrip('/')}/.",
                                   f"{host}:{REMOTE_DIR}/artifacts/")))  # fmt: skip
    command = "finetune-default" if artifacts or target.image == "runtime" else ""
    fleet: list[str] = []
    if superlink:  # the host network: the SuperNode reaches the SuperLink, and its own port stays local
        command, fleet = "fleet-join", ["--network=host", f"--env=EDGETRAIN_SUPERLINK={superlink}"]
        if target.image == "runtime" and not artifacts:
            raise ConfigError("--superlink with the runtime image trains exported artifacts: pass --artifacts DIR")
    run = ["docker", "rm", "-f", CONTAINER, ">/dev/null", "2>&1;", "docker", "run", "-d", "--name", CONTAINER,
           *target.run_flags, *fleet, f"--env=EDGETRAIN_DATA={data}", "-v", f"$HOME/{REMOTE_DIR}:/work", tag,
           command]  # fmt: skip
    steps.append(Step("start", _ssh(host, " ".join(a for a in run if a))))
    steps.append(Step("tail", _ssh(host, f"docker logs -f {CONTAINER}")))
    return steps


def _run(argv: tuple[str, ...] | list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DeployError(f"`{argv[0]}` is not installed on this machine: install it and run deploy again") from None
    except subprocess.TimeoutExpired:
        raise DeployError(f"`{' '.join(argv[:2])}` did not answer in {timeout:.0f} s") from None


def preflight(target: Target, host: str, registry: str | None = None) -> dict[str, str]:
    """Checks before anything runs: docker and buildx here, the board reachable, its architecture,
    JetPack and free disk. Returns what it found; raises `DeployError` with the fix."""
    found: dict[str, str] = {}
    if not Path(target.dockerfile).is_file():
        raise DeployError(f"{target.dockerfile} is not here: run deploy from the edgetrain source directory")
    if shutil.which("docker") is None:
        raise DeployError(
            "docker is not installed on this machine: install Docker Engine (docs.docker.com/engine/install)"
        )
    if target.platform != "linux/amd64" or registry:
        if _run(["docker", "buildx", "version"]).returncode != 0:
            raise DeployError(
                "docker buildx is missing: install the docker-buildx-plugin package (and qemu-user-static for arm64)"
            )
    probe = _run(_ssh(host, "uname -m; cat /etc/nv_tegra_release 2>/dev/null | head -1; df -Pk ~ | tail -1"))
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise DeployError(
            f"cannot reach {host} over ssh ({last}): check the address and that `ssh {host}` works without a password"
        )
    lines = probe.stdout.strip().splitlines()
    arch = lines[0].strip() if lines else "?"
    found["arch"] = arch
    want = "aarch64" if target.platform == "linux/arm64" else "x86_64"
    if arch != want:
        raise DeployError(
            f"{host} is {arch}, but the {target.device} image is built for {target.platform} ({want}): pick the right --device"
        )
    tegra = next((line for line in lines if line.startswith("#")), "")
    m = re.search(r"#\s*(R\d+)", tegra)
    if target.jetpack is not None:
        if not m:
            raise DeployError(f"{host} has no /etc/nv_tegra_release: it is not a Jetson running L4T")
        found["l4t"] = m.group(1)
        if L4T_TO_JETPACK.get(m.group(1)) != target.jetpack:
            raise DeployError(
                f"{host} runs L4T {m.group(1)} (JetPack {L4T_TO_JETPACK.get(m.group(1), '?')}), the image is for "
                f"JetPack {target.jetpack}: pass --jetpack {L4T_TO_JETPACK.get(m.group(1), 'N')}"
            )
    df = lines[-1].split() if len(lines) > 1 else []
    if len(df) >= 4 and df[3].isdigit():
        free_gib = int(df[3]) / 2**20
        found["free_gib"] = f"{free_gib:.1f}"
        if free_gib < IMAGE_GIB[target.image]:
            raise DeployError(
                f"{host} has {free_gib:.1f} GiB free, the {target.image} image needs about {IMAGE_GIB[target.image]} GiB: free some disk"
            )
    return found


def execute(steps: list[Step], cwd: Path, echo=print) -> None:
    """Run the steps in order; the first failure stops with its output."""
    for step in steps:
        echo(f"[{step.name}] {step.shell()}")
        if step.name == "tail":
            subprocess.run(list(step.argv), cwd=cwd)  # streams until the run ends or Ctrl-C
            continue
        proc = subprocess.run(list(step.argv), cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise DeployError(
                f"step '{step.name}' failed (exit {proc.returncode}); fix it and run deploy again:\n{tail}"
            )
