"""A fleet client without PyTorch: trains exported onnxruntime-training artifacts on its data and
sends the trainable weights back. numpy and onnxruntime only, as on the runtime image.

The artifacts must have been exported with the server's --trainable; BatchNorm statistics are
frozen in them (`export --bn frozen`), so this client sends back the statistics it was given.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgetrain.fleet.wire import STATS, FleetConfig, check_match, from_wire, shapes_of, to_wire
from edgetrain.runtime.trainer import OrtTrainer, load_manifest


class OrtClient:
    """One board's client on exported artifacts. `data`: (x_train, y_train, x_test, y_test)."""

    def __init__(self, cfg: FleetConfig, artifacts: str, data: tuple[np.ndarray, ...], name: str = "client"):
        self.cfg, self.name = cfg, name
        self.manifest = load_manifest(artifacts)
        self.trainer = OrtTrainer(artifacts)
        self.trainer.set_lr(cfg.lr)
        self.xtr, self.ytr, self.xte, self.yte = data

    def _mine(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """What this client exchanges: its trainable parameters, and those running statistics the
        server sends that the artifacts hold (frozen here)."""
        held = set(self.trainer.parameter_names())
        keys = list(self.manifest["trainable"]) + [k for k in names if k.endswith(STATS) and k in held]
        return {k: tuple(self.trainer.parameter(k).shape) for k in keys}

    def fit(self, arrays: dict[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._load(arrays)
        rng, losses, t0, b = np.random.default_rng(seed), [], time.perf_counter(), self.cfg.batch_size
        for _ in range(self.cfg.local_epochs):
            order = rng.permutation(len(self.ytr))
            for i in range(0, len(order), b):
                idx = order[i : i + b]
                if len(idx) >= 2:
                    losses.append(self.trainer.train_step(self.xtr[idx], self.ytr[idx])[0])
        out = to_wire({k: self.trainer.parameter(k).copy() for k in arrays})
        metrics = {"num-examples": len(self.ytr), "loss": float(np.mean(losses)) if losses else 0.0,
                   "peak-bytes": 0, "budget-bytes": 0, "seconds": time.perf_counter() - t0}  # fmt: skip
        return out, metrics

    def _load(self, arrays: dict[str, np.ndarray]) -> None:
        check_match(shapes_of(arrays), self._mine(list(arrays)), self.name)
        for k, v in from_wire(arrays).items():
            self.trainer.set_parameter(k, v)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Test figures; no statistics (they are frozen in the artifacts: this client adds none)."""
        from edgetrain.runtime.finetune import evaluate

        self._load(arrays)
        acc, loss = evaluate(self.trainer, self.xte, self.yte)
        return {"num-examples": len(self.yte), "num-train": len(self.ytr), "loss": loss, "accuracy": acc}, {}
