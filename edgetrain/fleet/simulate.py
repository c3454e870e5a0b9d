"""`edgetrain fleet simulate`: a whole fleet on one machine with Flower's simulation engine (Ray).

Each virtual client gets a device profile (cycled from `devices`) and plans its own training for
it; `ort_clients` of them train exported artifacts with onnxruntime instead of PyTorch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Any

from edgetrain.errors import ConfigError
from edgetrain.fleet.wire import FleetConfig

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
             "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip


def quiet_env() -> None:
    """Nothing phones home: Flower's telemetry and Ray's usage stats off."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def simulate(cfg: FleetConfig, clients: int, devices: list[str], out: str, eval_data: str | None = "digits",
             ort_artifacts: str | None = None, ort_clients: int = 0, cpus_per_client: float = 1.0,
             verbose: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the federation; returns the server's report (also in `out/report.json`)."""
    if cfg.min_clients > clients:
        raise ConfigError(f"--min-clients {cfg.min_clients} is larger than the fleet (--clients {clients}): "
                          f"lower --min-clients to at most {clients}")  # fmt: skip
    if ort_clients > clients or (ort_clients and not ort_artifacts):
        raise ConfigError("--ort-clients needs --artifacts and at most --clients clients")
    from edgetrain.devices.store import get_device

    for d in devices:
        get_device(d)  # an unknown profile is one line here, not a failed actor later
    quiet_env()
    nodes = {pid: {"artifacts": ort_artifacts} for pid in range(clients - ort_clients, clients)}
    # A fresh process for each run: a second run_simulation in one process hung (Ray's state
    # outlives the first), and the caller's process keeps no Ray workers.
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_run, args=(cfg, clients, devices, out, eval_data, nodes, cpus_per_client, verbose))
    child.start()
    child.join()
    from edgetrain.fleet.apps import raise_recorded

    raise_recorded(out)
    report = Path(out) / "report.json"
    if child.exitcode != 0 and not report.is_file():
        raise ConfigError(f"the simulation failed (exit {child.exitcode}): run again with --verbose to see why")
    if not report.is_file():
        raise ConfigError(f"the simulation ended without a report in {out}: run again with --verbose to see why")
    return json.loads(report.read_text())


def _run(cfg: FleetConfig, clients: int, devices: list[str], out: str, eval_data: str | None, nodes: dict,
         cpus_per_client: float, verbose: bool) -> None:  # fmt: skip
    """In the child process: Flower's simulation engine over the fleet's apps."""
    import logging

    from flwr.simulation import run_simulation

    from edgetrain.fleet.apps import make_client_app, make_server_app

    quiet_env()
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # not its deprecation notices nor sampling lines
        warnings.filterwarnings("ignore")
    run_simulation(
        make_server_app(cfg, out, eval_data, wait_s=60.0), make_client_app(devices, nodes), clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"logging_level": "error", "log_to_driver": verbose}},
        verbose_logging=verbose,
    )  # fmt: skip
