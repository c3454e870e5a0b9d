"""Real Flower processes: `fleet serve` starts a SuperLink and submits the fleet app to it
(`flwr run`); `fleet join` starts a SuperNode on a board, pointed at the SuperLink, and starts it
again when the SuperLink comes back after a restart (a new SuperLink knows no old node).

Each Flower process tree runs under `guard`, which kills the whole tree when `fleet serve` or
`fleet join` dies, even by kill -9. A server started again with the same --out resumes after
its last saved round.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.fleet.wire import FleetConfig

APP_COMPONENTS = {"serverapp": "edgetrain.fleet.apps:server_app", "clientapp": "edgetrain.fleet.apps:client_app"}


class Unreachable(EdgetrainError):
    exit_code = 6


def _tool(name: str) -> str:
    """A Flower command installed beside this Python (the venv's bin), or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: install Flower (pip install 'flwr[simulation]')")
    return found


def _env(home: Path) -> dict[str, str]:
    from edgetrain.fleet.simulate import QUIET_ENV

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower starts its helpers by name
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1", "PATH": path}


def _guarded(argv: list[str], env: dict[str, str], out=None) -> subprocess.Popen:
    """`argv` under the guard: its whole process tree goes when this process goes."""
    cmd = [sys.executable, "-m", "edgetrain.fleet.guard", *argv]
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out is not None else None)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as f:
        return _guarded(argv, env, f)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.3)
    return False


def write_app(directory: Path, run_config: dict[str, Any]) -> Path:
    """The Flower app (its pyproject names edgetrain's components; no code of its own)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in run_config.items())
    components = "\n".join(f'{k} = "{v}"' for k, v in APP_COMPONENTS.items())
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetrain-fleet"
version = "1.0.0"
description = "edgetrain fleet: federated fine-tuning across boards"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgetrain"

[tool.flwr.app.components]
{components}

[tool.flwr.app.config]
{config}
""")
    return directory


def serve(cfg: FleetConfig, out: str, host: str = "127.0.0.1", port: int = 9092, eval_data: str | None = "digits",
          wait_s: float = 300.0, echo: bool = True) -> dict[str, Any]:  # fmt: skip
    """Start a SuperLink on host:port, run the fleet app on it until its last round, stop it."""
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not port_free(host, port):
        raise ConfigError(f"{host}:{port} is in use (another fleet serve?): stop it or pass another --port")
    home = root / "flower"
    (home).mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "edgetrain"\n\n[superlink.edgetrain]\n'
                                      f'address = "{host}:{port}"\ninsecure = true\n')  # fmt: skip
    run_config = {**cfg.to_record(), "out": str(root), "eval-data": eval_data or "", "wait": wait_s}
    app = write_app(root / "app", run_config)
    env = _env(home)
    run: subprocess.Popen | None = None
    link = _start([_tool("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
                   "--disable-runtime-dependency-installation"], root / "superlink.log", env)  # fmt: skip
    try:
        if not wait_for_port(host, port, 60, link):
            raise Unreachable(f"the SuperLink did not start on {host}:{port} (see {root / 'superlink.log'})")
        run = _guarded([_tool("flwr"), "run", str(app), "edgetrain", "--stream"], env,
                       None if echo else subprocess.DEVNULL)  # fmt: skip
        _wait_for_report(root, run, link)
    finally:
        for p in (link, run):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    from edgetrain.fleet.apps import raise_recorded

    raise_recorded(str(root))
    return json.loads((root / "report.json").read_text())


def _wait_for_report(root: Path, run: subprocess.Popen, link: subprocess.Popen) -> None:
    """Until the run's report is written after its last round, or the run ends without one."""
    state = root / "state.json"
    while True:
        if (root / "error.json").is_file():
            return
        if (root / "report.json").is_file() and state.is_file() and _finished(root):
            return
        if link.poll() is not None:
            raise Unreachable(f"the SuperLink stopped (exit {link.returncode}); see {root / 'superlink.log'}")
        if run.poll() is not None and not _finished(root):
            time.sleep(2)  # the report may land just after the log stream closes
            if not _finished(root) and not (root / "error.json").is_file():
                raise EdgetrainError(f"the fleet run ended before its last round: see {root / 'superlink.log'}")
            return
        time.sleep(0.5)


def _finished(root: Path) -> bool:
    try:
        report = json.loads((root / "report.json").read_text())
        state = json.loads((root / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return report.get("rounds") == state.get("round") == int(state["config"]["rounds"])


def node_config(values: dict[str, Any]) -> str:
    """Flower's --node-config: key=value pairs, strings quoted."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items() if v is not None)


def join(superlink: str, node: dict[str, Any], port: int = 9094, max_wait: float = 60.0, log: str | None = None,
         echo=print) -> int:  # fmt: skip
    """Run a SuperNode until stopped. It tries an unreachable SuperLink for `max_wait` s, then
    says so; once it has joined, a lost SuperLink (restarted: it no longer knows this node) gets
    a new SuperNode that joins again, each bounded the same way."""
    host, _, link_port = superlink.rpartition(":")
    if not host or not link_port.isdigit():
        raise ConfigError(f"--superlink {superlink!r}: give HOST:PORT, e.g. 192.168.1.10:9092")
    if not port_free("127.0.0.1", port):
        raise ConfigError(f"127.0.0.1:{port} is in use (another supernode on this machine?): pass another --port")
    log_path = Path(log or f"fleet-node-{port}.log").resolve()
    env = _env(log_path.parent / "flower")
    argv = [_tool("flower-supernode"), "--insecure", "--superlink", superlink, "--port", str(port),
            "--max-wait-time", str(max_wait), "--node-config", node_config(node)]  # fmt: skip
    while True:
        start = log_path.stat().st_size if log_path.exists() else 0
        proc = _start(argv, log_path, env)
        try:
            joined = _watch(proc, log_path, start, superlink, echo)
        except KeyboardInterrupt:
            proc.terminate()
            return 130
        if not joined:  # (a SuperNode that lost its link exits 0 too: only Ctrl-C or a signal stops `join`)
            raise Unreachable(f"could not reach the SuperLink at {superlink} within {max_wait:.0f} s: check the address "
                              f"and that `edgetrain fleet serve` runs there (log: {log_path})")  # fmt: skip
        echo(f"edgetrain fleet: lost the SuperLink at {superlink}; joining again")
        time.sleep(1.0)


def _watch(proc: subprocess.Popen, log: Path, start: int, superlink: str, echo) -> bool:
    """Wait for the SuperNode to exit; True when it had joined (its node id is in the log)."""
    joined = False
    while proc.poll() is None:
        if not joined and "SuperNode ID:" in _tail(log, start):
            joined = True
            echo(f"edgetrain fleet: joined {superlink} ({log})")
        time.sleep(0.5)
    return joined or "SuperNode ID:" in _tail(log, start)


def _tail(log: Path, start: int) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")
