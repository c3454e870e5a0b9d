"""Each client's data: its own directory, or its part of a shared set (digits for tests and
benches), split by the federation's partition scheme. numpy only: the board's client uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import ConfigError
from edgetrain.fleet.partition import partition
from edgetrain.fleet.wire import FleetConfig


def client_data(cfg: FleetConfig, node: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """This node's (x_train, y_train, x_test, y_test): its own `data`, or its part of the shared
    set by `partition-id` of `num-partitions` under the federation's partition scheme."""
    from edgetrain.runtime.finetune import load_split

    spec = str(node.get("data", cfg.data))
    classes = [str(i) for i in range(10)] if spec.partition(":")[0] == "digits" else _folder_classes(spec)
    if len(classes) != cfg.num_classes:
        raise ConfigError(f"data {spec} has {len(classes)} classes, the fleet's model {cfg.num_classes}: "
                          "give every client data with the same classes")  # fmt: skip
    xtr, ytr, xte, yte = load_split(spec, cfg.input_size, classes, cfg.seed)
    n, pid = int(node.get("num-partitions", 1)), int(node.get("partition-id", 0))
    if n > 1:
        if not 0 <= pid < n:
            raise ConfigError(f"partition-id {pid} is outside 0..{n - 1}")
        tr, te = partition(ytr, n, cfg.partition, cfg.seed)[pid], partition(yte, n, "iid", cfg.seed)[pid]
        xtr, ytr, xte, yte = xtr[tr], ytr[tr], xte[te], yte[te]
    return xtr, ytr, xte, yte


def _folder_classes(spec: str) -> list[str]:
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"data {spec}: no such directory (use 'digits' or an ImageFolder directory)")
    return sorted(p.name for p in path.iterdir() if p.is_dir())
