from __future__ import annotations

import json
import subprocess
import sys

import psutil

from edgetrain.devices.calibrate import bandwidth_gbs, matmul_gflops, probe_usable_bytes
from edgetrain.devices.profile import profile_from_dict

MiB = 2**20


def test_probe_stops_at_the_cap_and_releases():
    before = psutil.Process().memory_info().rss
    got = probe_usable_bytes(available=10 * 2**30, cap=512 * MiB, chunk=128 * MiB)
    assert got == 512 * MiB
    assert psutil.Process().memory_info().rss - before < 256 * MiB  # nothing kept


def test_probe_never_exceeds_available():
    assert probe_usable_bytes(available=300 * MiB, chunk=128 * MiB) <= 300 * MiB * 0.95


def test_probe_leaves_a_margin_and_stops_when_the_host_runs_low():
    """Probing to the limit on a board makes the OOM killer take other processes."""
    got = probe_usable_bytes(available=1024 * MiB, chunk=64 * MiB, margin=512 * MiB, host_available=lambda: 2**40)
    assert got == 512 * MiB  # the margin is never probed
    free = iter([2048 * MiB, 1024 * MiB, 560 * MiB] + [0] * 100)  # another process takes memory meanwhile
    got = probe_usable_bytes(available=2048 * MiB, chunk=64 * MiB, margin=512 * MiB, host_available=lambda: next(free))
    assert got == 2 * 64 * MiB  # stopped before the third chunk would leave less than the margin


def test_throughput_probes_are_positive():
    assert matmul_gflops(n=256, repeat=3) > 0.1
    assert bandwidth_gbs(nbytes=16 * MiB, repeat=3) > 0.1


def test_profile_quick_cli_gives_a_plausible_calibrated_profile(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgetrain.cli.main", "profile", "--quick", "--json", "--save", "here"],
        capture_output=True, text=True, timeout=300, env={**_env(), "XDG_CONFIG_HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    prof = profile_from_dict(doc, "stdout")
    assert prof.source == "calibrated" and prof.kind == "cpu" and prof.name == "here"
    assert 0.1 * prof.total_memory_bytes <= prof.usable_memory_bytes <= prof.total_memory_bytes
    assert prof.fp32_gflops > 0 and prof.memory_bandwidth_gbs > 0 and prof.reserved_bytes["framework"] > 50 * MiB
    assert (tmp_path / "edgetrain/profiles/here.yaml").is_file()


def _env():
    import os

    return dict(os.environ)
