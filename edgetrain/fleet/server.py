"""The server's side of a fleet: rounds of FedAvg or FedProx (Flower's strategies) over the
exchanged weights, a central evaluation after each round, and its state saved atomically after
every round, so a server killed mid-run resumes from its last round.

State in `out/`: global.npz (the exchanged weights), state.json (config, round, history),
report.json and accuracy.png at the end. Clients that fail mid-round are dropped from that
round; a round with fewer than `min_clients` replies is tried again (bounded).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.fleet.wire import REASON, REFUSED, STATS, FleetConfig, MismatchError, nbytes, pack, unpack

ROUND_TRIES = 3  # a round with too few replies is tried this often before the run stops


class FleetError(EdgetrainError):
    """The federation cannot go on: too few clients, or every client refused."""

    exit_code = 5


def strategy_for(cfg: FleetConfig):
    """Flower's FedAvg or FedProx, sampling `fraction` of the connected clients (at least min_clients)."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    kw = dict(fraction_train=cfg.fraction, fraction_evaluate=0.0, min_train_nodes=cfg.min_clients,
              min_available_nodes=cfg.min_clients)  # fmt: skip
    return FedProx(proximal_mu=cfg.proximal_mu, **kw) if cfg.strategy == "fedprox" else FedAvg(**kw)


class FleetServer:
    """Runs the rounds on a Flower Grid. `evaluate(arrays) -> (loss, accuracy)` or None."""

    def __init__(self, cfg: FleetConfig, out: str | Path, initial: dict[str, np.ndarray], evaluate=None,
                 wait_s: float = 120.0, log=print):  # fmt: skip
        self.cfg, self.out, self.evaluate, self.wait_s, self.log = cfg, Path(out), evaluate, wait_s, log
        self.arrays, self.round, self.history = initial, 0, []

    # --- state ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        state_file = self.out / "state.json"
        if not state_file.is_file():
            return
        state = json.loads(state_file.read_text())
        saved = FleetConfig.from_record(state["config"])
        if {**saved.to_record(), "rounds": 0} != {**self.cfg.to_record(), "rounds": 0}:
            raise ConfigError(f"{self.out} holds a fleet run with other settings: resume it with the same options, "
                              "or give another --out")  # fmt: skip
        with np.load(self.out / "global.npz") as z:
            self.arrays = {k: z[k] for k in z.files}
        self.round, self.history = state["round"], state["history"]
        self.log(f"edgetrain fleet: resuming {self.out} after round {self.round} of {self.cfg.rounds}")

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        _atomic(self.out / "global.npz", buf.getvalue())
        state = {"config": self.cfg.to_record(), "round": self.round, "history": self.history}
        _atomic(self.out / "state.json", json.dumps(state, indent=1).encode())

    # --- rounds --------------------------------------------------------------------------------
    def run(self, grid) -> dict[str, Any]:
        with _exclusive(self.out / ".lock", self.wait_s):
            self._resume()  # again, under the lock: a server killed a moment ago may have saved one more round
            return self._run(grid)

    def _run(self, grid) -> dict[str, Any]:
        if self.round == 0 and self.evaluate is not None and not self.history:
            loss, acc = self.evaluate(self.arrays)
            self.history.append({"round": 0, "accuracy": acc, "loss": loss})
            self._save()
        strategy = strategy_for(self.cfg)
        while self.round < self.cfg.rounds:
            self._round(grid, strategy, self.round + 1)
        return self.report()

    def _round(self, grid, strategy, r: int) -> None:
        from flwr.app import ConfigRecord

        t0 = time.perf_counter()
        for attempt in range(1, ROUND_TRIES + 1):
            self._wait_for_clients(grid)
            random.seed(self.cfg.seed * 1000 + r * 10 + attempt)  # Flower's sampling draws from `random`
            msgs = list(strategy.configure_train(r, pack(self.arrays), ConfigRecord(self.cfg.to_record()), grid))
            replies = list(grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
            ok, failed = self._sort(replies)
            if len(ok) >= self.cfg.min_clients:
                break
            self.log(f"edgetrain fleet: round {r}: {len(ok)} of {len(msgs)} clients replied (fewer than "
                     f"--min-clients {self.cfg.min_clients}); trying the round again ({attempt}/{ROUND_TRIES})")  # fmt: skip
        else:
            raise FleetError(f"round {r}: fewer than --min-clients {self.cfg.min_clients} replied in {ROUND_TRIES} "
                             "tries: check the clients' logs, or lower --min-clients")  # fmt: skip
        ok.sort(key=_client_order)  # sums in a fixed order: a rerun is the same run, whatever order replies came in
        agg, _ = strategy.aggregate_train(r, ok)
        self.arrays = unpack(agg)
        averaged = self.evaluate(self.arrays) if self.evaluate and any(k.endswith(STATS) for k in self.arrays) else None
        clients = self._pool_statistics(grid, r, [m.metadata.src_node_id for m in ok])
        entry = {"round": r, "clients": len(msgs), "replied": len(ok), "failed": failed,
                 "bytes_sent": nbytes(self.arrays) * len(msgs), "bytes_received": nbytes(self.arrays) * len(ok),
                 "client_figures": [_figures(m) for m in ok], **clients}  # fmt: skip
        if self.evaluate is not None:
            entry["loss"], entry["accuracy"] = self.evaluate(self.arrays)
        if averaged is not None:  # the same weights with the clients' own running statistics averaged
            entry["accuracy_averaged_statistics"] = averaged[1]
        entry["seconds"] = time.perf_counter() - t0
        self.round = r
        self.history.append(entry)
        self._save()
        acc = f", accuracy {entry['accuracy']:.2%}" if "accuracy" in entry else ""
        times = [h["seconds"] for h in self.history if "seconds" in h]
        eta = sum(times) / len(times) * (self.cfg.rounds - r)
        self.log(f"edgetrain fleet: round {r}/{self.cfg.rounds}: {len(ok)} clients{acc} ({entry['seconds']:.1f} s, "
                 f"{3600 / max(entry['seconds'], 1e-9):.0f} rounds/h, ETA {eta:.0f} s)")  # fmt: skip

    def _pool_statistics(self, grid, r: int, nodes: list[int]) -> dict[str, Any]:
        """Federated precise BN: the clients run the averaged weights over their training data and
        send back BatchNorm statistics; pooled by sample count (on the wire as second moments),
        they are the statistics of the global weights on all the fleet's data, which the weights
        never saw during local training. Also the clients' own test accuracy."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        content = RecordDict(
            {"arrays": pack(self.arrays), "config": ConfigRecord({**self.cfg.to_record(), "server-round": r})}
        )
        msgs = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        replies, _ = self._sort(list(grid.send_and_receive(msgs, timeout=self.cfg.round_timeout)))
        replies.sort(key=lambda m: nodes.index(m.metadata.src_node_id))  # the train replies' fixed order
        figures = [dict(m.content["metrics"]) for m in replies]
        with_stats = [(m, f) for m, f in zip(replies, figures, strict=True) if "arrays" in m.content]
        if with_stats:
            total = sum(f["num-train"] for _, f in with_stats)
            stats = [(unpack(m.content["arrays"]), f["num-train"] / total) for m, f in with_stats]
            for k in stats[0][0]:
                self.arrays[k] = sum(w * s[k] for s, w in stats).astype(self.arrays[k].dtype)
        n = sum(f["num-examples"] for f in figures)
        return {"client_accuracy": sum(f["accuracy"] * f["num-examples"] for f in figures) / n} if n else {}

    def _sort(self, replies: list) -> tuple[list, list[str]]:
        """(good replies, one line per failed client); a client whose model does not match stops the run."""
        ok, failed = [], []
        for m in replies:
            if not m.has_error():
                ok.append(m)
                continue
            reason = _reason(m.error.reason)
            if m.error.code == REFUSED + MismatchError.exit_code:
                raise MismatchError(f"client node {m.metadata.src_node_id}: {reason}")
            failed.append(f"node {m.metadata.src_node_id}: {reason}")
            self.log(f"edgetrain fleet: client node {m.metadata.src_node_id} failed: {reason}")
        return ok, failed

    def _wait_for_clients(self, grid) -> None:
        """Bounded: `min_clients` connected within `wait_s`, or one line."""
        deadline = time.monotonic() + self.wait_s
        while len(nodes := list(grid.get_node_ids())) < self.cfg.min_clients:
            if time.monotonic() > deadline:
                raise FleetError(f"only {len(nodes)} clients connected within {self.wait_s:.0f} s, fewer than "
                                 f"--min-clients {self.cfg.min_clients}: start more clients or lower --min-clients")  # fmt: skip
            time.sleep(0.5)

    # --- results -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        accs = [(h["round"], h["accuracy"]) for h in self.history if "accuracy" in h]
        report = {"config": self.cfg.to_record(), "rounds": self.round, "history": self.history,
                  "final_accuracy": accs[-1][1] if accs else None,
                  "rounds_to_95": next((r for r, a in accs if a >= 0.95 and r > 0), None),
                  "bytes_per_round": nbytes(self.arrays), "model": str(self.out / "global.npz")}  # fmt: skip
        _atomic(self.out / "report.json", json.dumps(report, indent=1).encode())
        if len(accs) > 1:
            title = f"{self.cfg.model}, {self.cfg.strategy}, partition {self.cfg.partition}"
            plot_accuracy({"federated": accs}, self.out / "accuracy.png", title)
        return report


@contextlib.contextmanager
def _exclusive(path: Path, wait_s: float):
    """One server process per run directory: a killed server's app process may live a moment
    longer; the new one waits for its lock (bounded) instead of racing it for state.json."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"{path.parent} is in use by another fleet server: stop it, or use another --out"
                    ) from None
                time.sleep(0.5)
        yield


def _client_order(msg) -> tuple[str, int]:
    """Replies by client name (stable across runs; Flower's node ids are drawn anew), then node id."""
    info = msg.content["info"] if "info" in msg.content else {}
    return str(info.get("name", "")), msg.metadata.src_node_id


def _figures(msg) -> dict[str, Any]:
    """A client's reply figures: its device, plan, peak and budget, loss and sample count."""
    metrics = dict(next(iter(msg.content.metric_records.values())))
    info = dict(msg.content["info"]) if "info" in msg.content else {}
    return {"node": msg.metadata.src_node_id, **info, **metrics}


def _reason(text: str) -> str:
    """The client's one line: edgetrain's own refusal, or the last line of Flower's error text."""
    if REASON in text:
        return text.split(REASON, 1)[1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no reason given"


def plot_accuracy(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Test accuracy by round, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 3.6), dpi=120)
    for label, pts in curves.items():
        ax.plot([r for r, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: no curve hidden
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
