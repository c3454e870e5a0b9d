"""`edgetrain fleet`: federated fine-tuning across boards on Flower (serve, join, simulate)."""

from __future__ import annotations

import argparse
from typing import Any

from edgetrain.cli.common import Verb, add_json, mib, print_json, table


def _fleet_options(p: argparse.ArgumentParser) -> None:
    """What the server decides for everyone: the model, what trains, the rounds and the strategy."""
    p.add_argument("--model", "-m", default="cifar_resnet20")
    p.add_argument("--rounds", "-r", type=int, default=10)
    p.add_argument("--fraction", type=float, default=1.0, help="share of the connected clients trained each round")
    p.add_argument("--min-clients", type=int, default=2, help="a round needs this many replies (else it is retried)")
    p.add_argument("--trainable", default="", metavar="PATTERNS", help="parameters that train and are averaged, e.g. 'layers.8,fc' (default: all)")  # fmt: skip
    p.add_argument(
        "--init", default="", metavar="RUN|FILE", help="start from a fit run (its checkpoint) or a weights file"
    )
    p.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--allow", choices=("exact", "lossy", "architecture"), default="lossy",
                   help="the most each client's planner may change training (architecture is held to lossy)")  # fmt: skip
    p.add_argument("--partition", default="label:2", help="how a shared set is split: iid, label:K or dirichlet:A")
    p.add_argument("--data", default="digits", help="the clients' shared set (a client's own --data wins)")
    p.add_argument("--eval-data", default="digits", help="the server's test set for per-round accuracy ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    p.add_argument("--out", "-o", default="fleet", help="run directory: global weights, state, report, plot")


def _config(args: argparse.Namespace):
    from edgetrain.fleet.wire import FleetConfig, fix_shapes

    cfg = FleetConfig(args.model, args.num_classes, args.input_size, args.trainable, args.init, args.rounds, args.fraction,
                      args.min_clients, args.strategy, args.proximal_mu, args.local_epochs, args.batch_size, args.lr,
                      "sgd", args.allow, args.data, args.partition, args.seed, args.round_timeout)  # fmt: skip
    cfg, note = fix_shapes(cfg)
    if note:
        import sys

        print(f"edgetrain fleet: {note}", file=sys.stderr)
    from edgetrain.models import list_models

    if cfg.model not in list_models():
        from edgetrain.errors import ConfigError

        raise ConfigError(f"model '{cfg.model}' unknown: `edgetrain models` lists them")
    return cfg


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    rows, last = [], report["history"][-1] if report["history"] else {}
    for c in sorted(last.get("client_figures", []), key=lambda c: str(c.get("name"))):
        peak, budget = c.get("peak-bytes") or None, c.get("budget-bytes") or None
        rows.append([c.get("name"), c.get("device"), c.get("plan"), mib(peak), mib(budget), f"{c.get('loss', 0):.3f}"])
    if rows:
        table(
            f"round {report['rounds']}: clients", ["client", "device", "plan", "peak MiB", "budget MiB", "loss"], rows
        )
    acc, r95 = report.get("final_accuracy"), report.get("rounds_to_95")
    line = f"{report['rounds']} rounds"
    line += f"; test accuracy {acc:.2%}" if acc is not None else ""
    line += f" (95 % first at round {r95})" if r95 else ""
    print(
        f"{line}; {report['bytes_per_round'] / 2**20:.2f} MiB a client each way a round; weights in {report['model']}"
    )


class Fleet(Verb):
    name = "fleet"
    help = "federated fine-tuning across boards on Flower: serve (SuperLink), join (SuperNode), simulate"
    examples = (
        "edgetrain fleet simulate --clients 8 --devices jetson-nano,jetson-orin-nano,gtx750-1gb --rounds 10",
        "edgetrain fleet simulate --clients 4 --ort-clients 2 --artifacts art --trainable fc",
        "edgetrain fleet serve --model cifar_resnet20 --rounds 20 --fraction 0.5 --min-clients 3 --port 9092",
        "edgetrain fleet join --superlink 192.168.1.10:9092 --device jetson-nano --data /data/images",
        "edgetrain fleet join --superlink 192.168.1.10:9092 --artifacts art --data /data/images   # no torch",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        sim = sub.add_parser("simulate", help="the whole fleet on this machine (Flower's simulation engine)")
        _fleet_options(sim)
        sim.add_argument("--clients", "-n", type=int, default=8)
        sim.add_argument("--devices", default="jetson-nano,jetson-orin-nano,gtx750-1gb",
                         help="device profiles, given to the clients in turn")  # fmt: skip
        sim.add_argument(
            "--ort-clients", type=int, default=0, help="this many clients train --artifacts on onnxruntime"
        )
        sim.add_argument("--artifacts", help="exported artifacts for the onnxruntime clients (same --trainable)")
        sim.add_argument("--verbose", action="store_true", help="Flower's and Ray's logs too")
        add_json(sim)
        srv = sub.add_parser("serve", help="start a SuperLink and run the fleet's rounds on it")
        _fleet_options(srv)
        srv.add_argument("--host", default="127.0.0.1", help="address the boards reach (0.0.0.0: every interface)")
        srv.add_argument("--port", type=int, default=9092)
        srv.add_argument("--wait", type=float, default=300.0, help="seconds to wait for --min-clients to join")
        add_json(srv)
        join = sub.add_parser("join", help="start a SuperNode: this board trains in the fleet at --superlink")
        join.add_argument("--superlink", required=True, metavar="HOST:PORT")
        join.add_argument("--device", "-d", help="this board's device profile (torch clients; default: detected cpu)")
        join.add_argument("--data", help="this board's data: an ImageFolder directory, or 'digits' with --partition-id")
        join.add_argument("--artifacts", help="train exported artifacts on onnxruntime (no torch needed)")
        join.add_argument("--init", help="this board's copy of the server's --init (torch clients)")
        join.add_argument("--partition-id", type=int, help="with shared data: which part is this board's")
        join.add_argument("--num-partitions", type=int, help="with shared data: into how many parts it is split")
        join.add_argument("--name", help="this board's name in the server's report")
        join.add_argument("--port", type=int, default=9094, help="the SuperNode's local port")
        join.add_argument("--max-wait", type=float, default=60.0, help="seconds to keep trying an unreachable server")
        join.add_argument("--log", help="write the SuperNode's log here instead of the terminal")
        p.epilog = self.epilog()

    def run(self, args: argparse.Namespace) -> int:
        return getattr(self, f"_{args.action}")(args)

    def _simulate(self, args: argparse.Namespace) -> int:
        from edgetrain.fleet.simulate import simulate

        cfg = _config(args)
        report = simulate(cfg, args.clients, [d for d in args.devices.split(",") if d], args.out, args.eval_data or None,
                          args.artifacts, args.ort_clients, verbose=args.verbose)  # fmt: skip
        _show(report, args.json)
        return 0

    def _serve(self, args: argparse.Namespace) -> int:
        from edgetrain.fleet.processes import serve

        report = serve(_config(args), args.out, args.host, args.port, args.eval_data or None, args.wait, not args.json)
        _show(report, args.json)
        return 0

    def _join(self, args: argparse.Namespace) -> int:
        from edgetrain.errors import ConfigError
        from edgetrain.fleet.processes import join

        if args.device and args.artifacts:
            raise ConfigError("--device plans a torch client, --artifacts runs onnxruntime: give one of them")
        if args.device:
            from edgetrain.devices.store import get_device

            get_device(args.device)  # an unknown or unreadable profile is one line here, before any network
        if (args.partition_id is None) != (args.num_partitions is None):
            raise ConfigError("--partition-id and --num-partitions go together")
        node = {"device": args.device, "data": args.data, "artifacts": args.artifacts, "name": args.name,
                "init": args.init, "partition-id": args.partition_id, "num-partitions": args.num_partitions}  # fmt: skip
        return join(args.superlink, node, args.port, args.max_wait, args.log)
