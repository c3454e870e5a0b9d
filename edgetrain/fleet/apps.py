"""Flower's ServerApp and ClientApp for edgetrain fleets.

`client_app` and `server_app` (module level) are the components a real SuperLink/SuperNode
deployment loads (the app's pyproject names them): the server reads its options from the run
config, each client from its node config (`device`, `data` or `artifacts`, `partition-id`,
`num-partitions`). `make_server_app`/`make_client_app` build the same apps with options given
directly, for the simulation engine. Importing this module imports neither torch nor edgetrain's
training code: a board without PyTorch runs the client on onnxruntime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgetrain.errors import EdgetrainError
from edgetrain.fleet.data import client_data
from edgetrain.fleet.wire import REASON, REFUSED, FleetConfig, pack, unpack

_CLIENTS: dict[tuple, Any] = {}  # one client object per (config, node) in a process: plan and data kept


def _client(cfg: FleetConfig, node: dict[str, Any], devices: list[str], context: Context):
    """The torch client or, where the node names exported artifacts, the onnxruntime one. Its
    plan is kept in the node's Flower context: a client process started for a later round
    (a real SuperNode starts one per message) does not plan again."""
    pid = int(node.get("partition-id", 0))
    key = (tuple(sorted(cfg.to_record().items())), tuple(sorted((k, str(v)) for k, v in node.items())))
    if key not in _CLIENTS:
        name = str(node.get("name", f"client {pid}"))
        data = client_data(cfg, node)
        if "artifacts" in node:
            from edgetrain.fleet.ort_client import OrtClient

            _CLIENTS[key] = OrtClient(cfg, str(node["artifacts"]), data, name)
        else:
            from edgetrain.fleet.torch_client import TorchClient

            device = str(node.get("device") or (devices[pid % len(devices)] if devices else "cpu"))
            kept = context.state.get("edgetrain")
            plan = json.loads(str(kept["plan"])) if kept is not None and kept.get("key") == str(key) else None
            _CLIENTS[key] = client = TorchClient(cfg, device, data, name, plan, node.get("init"))
            context.state["edgetrain"] = ConfigRecord({"key": str(key), "plan": json.dumps(client.plan.to_dict())})
    return _CLIENTS[key]


def _node(context: Context, nodes: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    node = dict(context.node_config)
    return {**node, **(nodes or {}).get(int(node.get("partition-id", 0)), {})}


def _refused(msg: Message, err: EdgetrainError) -> Message:
    """An edgetrain error as Flower's error reply: the server reads the line after 'edgetrain: '."""
    from flwr.app import Error

    print(f"edgetrain fleet: {err}", file=sys.stderr, flush=True)
    return Message(Error(code=REFUSED + err.exit_code, reason=f"{REASON}{err}"), reply_to=msg)


def handle_train(msg: Message, context: Context, devices: list[str], nodes: dict | None = None) -> Message:
    """A train message: load the global weights, train locally under this client's plan, reply."""
    try:
        cfg = FleetConfig.from_record(msg.content["config"])
        client = _client(cfg, _node(context, nodes), devices, context)
        r = int(msg.content["config"]["server-round"])
        arrays, metrics = client.fit(unpack(msg.content["arrays"]), seed=cfg.seed * 7919 + r)
    except EdgetrainError as e:
        return _refused(msg, e)
    info = {"name": client.name, "kind": type(client).__name__,
            "device": getattr(getattr(client, "profile", None), "name", "onnxruntime"),
            "plan": client.plan.summary() if hasattr(client, "plan") else "artifacts"}  # fmt: skip
    content = RecordDict({"arrays": pack(arrays), "metrics": MetricRecord(metrics), "info": ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, devices: list[str], nodes: dict | None = None) -> Message:
    """An evaluate message: test figures, and BatchNorm statistics of the global weights."""
    try:
        cfg = FleetConfig.from_record(msg.content["config"])
        metrics, stats = _client(cfg, _node(context, nodes), devices, context).evaluate(unpack(msg.content["arrays"]))
    except EdgetrainError as e:
        return _refused(msg, e)
    content = RecordDict({"metrics": MetricRecord(metrics), **({"arrays": pack(stats)} if stats else {})})
    return Message(content=content, reply_to=msg)


def make_client_app(devices: list[str] | None = None, nodes: dict[int, dict[str, Any]] | None = None) -> ClientApp:
    """`devices`: cycled over partition ids where a node names none (simulation); `nodes`: extra
    node config by partition id (simulation: which clients run on artifacts)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, devices or [], nodes)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, devices or [], nodes)

    return app


def make_server_app(cfg: FleetConfig | None = None, out: str | None = None, eval_data: str | None = "digits",
                    wait_s: float = 120.0) -> ServerApp:  # fmt: skip
    """The server: options given here (simulation), or read from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = dict(context.run_config)
        c = cfg or FleetConfig.from_record(run)
        serve_rounds(grid, c, out or str(run.get("out", "fleet")),
                     eval_data if cfg else (str(run.get("eval-data", "digits")) or None),
                     wait_s if cfg else float(run.get("wait", wait_s)))  # fmt: skip

    return app


def serve_rounds(grid: Grid, cfg: FleetConfig, out: str, eval_data: str | None, wait_s: float) -> dict[str, Any]:
    """Build the global model, and run (or resume) the rounds on `grid`."""
    from edgetrain.fleet.server import FleetServer, log_stderr
    from edgetrain.fleet.torch_client import build_model, central_evaluator, get_arrays

    try:
        model = build_model(cfg)
        evaluate = central_evaluator(model, cfg, eval_data) if eval_data else None
        return FleetServer(cfg, out, get_arrays(model), evaluate, wait_s, log_stderr).run(grid)
    except EdgetrainError as e:  # the launcher (simulate, serve) turns it into its one line and exit code
        record_error(out, e)
        raise


def record_error(out: str, err: EdgetrainError) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    doc = {"message": str(err), "exit_code": err.exit_code, "type": type(err).__name__}
    Path(out, "error.json").write_text(json.dumps(doc))


def raise_recorded(out: str) -> None:
    """The server's error, recorded in `out/error.json` by the server process or thread, raised here."""
    path = Path(out, "error.json")
    if path.is_file():
        doc = json.loads(path.read_text())
        path.unlink()
        err = EdgetrainError(doc["message"])
        err.exit_code = doc["exit_code"]
        raise err


client_app = make_client_app()
server_app = make_server_app()
