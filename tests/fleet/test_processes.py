"""Real Flower processes on 127.0.0.1: `fleet serve` (a SuperLink and the app run) and `fleet join`
(SuperNodes). Every wait is bounded; every process is stopped by its id at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGETRAIN = [sys.executable, "-m", "edgetrain.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    """The processes a test started, by id, so that it stops exactly those."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.port = tmp, [], free_port()
        self.out = tmp / "server"

    def serve(self, rounds: int, *extra: str) -> subprocess.Popen:
        argv = [*EDGETRAIN, "fleet", "serve", "--model", "cifar_resnet8", "--rounds", str(rounds), "--partition", "iid",
                "--port", str(self.port), "--out", str(self.out), "--wait", "120", *extra]  # fmt: skip
        return self._start(argv, "serve.log")

    def join(self, i: int, n: int) -> subprocess.Popen:
        argv = [*EDGETRAIN, "fleet", "join", "--superlink", f"127.0.0.1:{self.port}", "--device", "jetson-nano",
                "--data", "digits", "--partition-id", str(i), "--num-partitions", str(n), "--port", str(free_port()),
                "--max-wait", "90", "--log", str(self.tmp / f"node{i}.log")]  # fmt: skip
        return self._start(argv, f"join{i}.log")

    def _start(self, argv: list[str], log: str) -> subprocess.Popen:
        f = open(self.tmp / log, "ab")
        p = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp, env={**os.environ, "COLUMNS": "160"}
        )
        self.procs.append(p)
        return p

    def wait_round(self, r: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if json.loads((self.out / "state.json").read_text())["round"] >= r:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"round {r} not saved within {timeout} s:\n{self.log('serve.log')}")

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.stop()


def test_a_real_superlink_and_two_supernodes_finish_a_round(fleet):
    server = fleet.serve(1, "--min-clients", "2")
    for i in range(2):
        fleet.join(i, 2)
    assert server.wait(240) == 0, fleet.log("serve.log")
    report = json.loads((fleet.out / "report.json").read_text())
    assert report["rounds"] == 1 and report["history"][-1]["replied"] == 2
    assert {c["device"] for c in report["history"][-1]["client_figures"]} == {"jetson-nano"}
    assert "1 rounds; test accuracy" in fleet.log("serve.log")


@pytest.mark.slow
def test_kill_9_of_a_supernode_and_of_the_server_and_the_federation_still_finishes(fleet):
    """A board killed mid-round: the round ends with the others when its timeout runs out, the
    board comes back and rejoins. The server killed: started again, it resumes after its last round."""
    server = fleet.serve(4, "--min-clients", "2", "--round-timeout", "25")
    nodes = [fleet.join(i, 3) for i in range(3)]
    fleet.wait_round(1, 240)
    nodes[2].send_signal(signal.SIGKILL)  # its SuperNode and ClientApp go with it (parent-death signal)
    fleet.wait_round(2, 240)
    nodes[2] = fleet.join(2, 3)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    saved = json.loads((fleet.out / "state.json").read_text())["round"]
    time.sleep(3)  # the old SuperLink's port is released once its process is gone
    server = fleet.serve(4, "--min-clients", "2", "--round-timeout", "25")
    assert server.wait(420) == 0, fleet.log("serve.log")
    report = json.loads((fleet.out / "report.json").read_text())
    assert [h["round"] for h in report["history"]] == [0, 1, 2, 3, 4]
    assert min(h["replied"] for h in report["history"][1:]) == 2  # the round the board died in
    assert f"resuming {fleet.out} after round {saved} of 4" in fleet.log("serve.log")
