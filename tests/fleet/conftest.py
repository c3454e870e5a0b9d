"""An in-process Flower grid: the server's real round loop and the clients' real message
handlers, without Ray or network processes. Nodes can drop messages (a killed board: no reply
before the timeout) or the grid can die mid-round (a killed server)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from edgetrain.fleet import apps


class ServerKilled(Exception):
    """The server process died here (kill -9): nothing after this point ran."""


class LocalGrid:
    def __init__(self, nodes: dict[int, dict], drop=lambda node, attempt: False, die_in_round: int | None = None):
        self.nodes, self.drop, self.die_in_round = nodes, drop, die_in_round
        self.contexts = {n: Context(1, n, cfg, RecordDict(), {}) for n, cfg in nodes.items()}
        self.train_calls: dict[int, int] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.supercore.task_identity import TaskIdentity

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            r = int(m.content["config"]["server-round"])
            if m.metadata.message_type == MessageType.TRAIN:
                self.train_calls[r] = self.train_calls.get(r, 0) + 1
                if r == self.die_in_round:
                    raise ServerKilled(f"round {r}")
                if self.drop(node, self.train_calls[r]):
                    continue
            TaskIdentity.node_id = node
            handler = apps.handle_train if m.metadata.message_type == MessageType.TRAIN else apps.handle_evaluate
            replies.append(handler(m, self.contexts[node], ["jetson-orin-nano"]))
            TaskIdentity.node_id = 1
        return replies


@pytest.fixture
def grid_ids(monkeypatch):
    """Flower's message ids need a run: give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield
    apps._CLIENTS.clear()


def digits_nodes(n: int, extra: dict[int, dict] | None = None) -> dict[int, dict]:
    return {100 + i: {"partition-id": i, "num-partitions": n, **(extra or {}).get(i, {})} for i in range(n)}


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
