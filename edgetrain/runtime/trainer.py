"""onnxruntime-training on the board, through its compiled bindings only.

`onnxruntime.training` (and `.api`) import torch at import time (upstream issue #22070); the
classes it wraps, `CheckpointState`, `Module` and `Optimizer` in `onnxruntime.capi._pybind_state`,
do not. `OrtTrainer` wraps those, as `onnxruntime.training.api` does, without torch. Even
`import onnxruntime` imports torch when it is installed (its build check imports
`onnxruntime.training.ortmodule`): `ort_bindings` imports it with that check skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import ConfigError

ARTIFACTS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
# onnxruntime's own exception types (bases: Exception, not RuntimeError)
ORT_ERRORS = ("Fail", "InvalidArgument", "InvalidProtobuf", "NoSuchFile", "NoModel", "InvalidGraph", "RuntimeException")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The artifacts' manifest, with every file present and matching its checksum."""
    d = Path(directory)
    path = d / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{d}: no manifest.json; export the artifacts with `edgetrain export --out {d}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not valid JSON; export the artifacts again") from None
    for name in ARTIFACTS:
        f = d / name
        if not f.is_file():
            raise ConfigError(f"{d}: artifact {name} is missing; copy the whole directory or export again")
        want = manifest.get("files", {}).get(name)
        if want != sha256_file(f):
            raise ConfigError(f"{f}: checksum does not match manifest.json (corrupt or partial copy): copy it again")
    return manifest


def ort_bindings():
    """`onnxruntime.capi._pybind_state`, imported without torch: with torch installed, importing
    onnxruntime the usual way loads it through ortmodule (865 MB of RSS instead of 306 MB on the
    host, 6 s). Only onnxruntime's build-info check needs ortmodule; it is skipped."""
    if "onnxruntime" not in sys.modules:
        blocked = "onnxruntime.training.ortmodule"
        had = blocked in sys.modules
        held = sys.modules.get(blocked)
        sys.modules[blocked] = None  # type: ignore[assignment]  # import -> ImportError: "not a training build"
        try:
            import onnxruntime  # noqa: F401
        finally:
            if had:
                sys.modules[blocked] = held  # type: ignore[assignment]
            else:
                del sys.modules[blocked]
    from onnxruntime.capi import _pybind_state

    return _pybind_state


class OrtTrainer:
    """Training and evaluation steps, optimizer, checkpoints and inference export of one artifact set."""

    def __init__(self, directory: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
        C = ort_bindings()
        from onnxruntime.capi.onnxruntime_inference_collection import get_ort_device_type

        self._C = C
        C.set_default_logger_severity(3)  # errors only: the graph transformers log every pass at info
        d = Path(directory)
        self.manifest = load_manifest(d)
        self.input_shape = tuple(self.manifest["input"]["shape"])
        errors = (RuntimeError, *(getattr(C, n) for n in ORT_ERRORS if hasattr(C, n)))
        try:
            self.state = C.load_checkpoint(str(checkpoint or d / "checkpoint"))
            dev = C.OrtDevice(get_ort_device_type(device, 0), C.OrtDevice.default_memory(), 0)
            opts = C.SessionOptions()
            self.module = C.Module(str(d / "training_model.onnx"), self.state, str(d / "eval_model.onnx"), dev, opts)
            self.optimizer = C.Optimizer(str(d / "optimizer_model.onnx"), self.state, dev, opts)
        except errors as e:  # the message is onnxruntime's source location: the type says enough
            raise ConfigError(f"{d}: the artifacts cannot be loaded ({type(e).__name__} in onnxruntime): they are "
                              "damaged or from another onnxruntime; export them again with `edgetrain export`") from None  # fmt: skip

    def _check(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"input batch of shape {tuple(x.shape)} does not match the artifacts' (N, {', '.join(map(str, self.input_shape))})"
            )
        return [np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward, backward and optimizer step; returns (loss, logits)."""
        fetches = self._C.OrtValueVector()
        self.module.train_step(self._check(x, y), fetches)
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return float(fetches[0].numpy()), fetches[1].numpy()

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        fetches = self._C.OrtValueVector()
        self.module.eval_step(self._check(x, y), fetches)
        return float(fetches[0].numpy()), fetches[1].numpy()

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def parameter(self, name: str) -> np.ndarray:
        return self.state.get_parameter(name).data.numpy()

    def parameter_names(self) -> list[str]:
        """Every parameter in the checkpoint state: trainable and frozen initializers."""
        return list(self.state.parameter_names())

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        """Overwrite one parameter (a fleet client loads the global weights this way)."""
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        param = self.state.get_parameter(name)
        param.copy_from(self.state, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, np.float32))._ortvalue)

    def save(self, path: str | Path) -> Path:
        """Atomically: written next to `path`, then renamed over it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self._C.save_checkpoint(self.state, str(tmp), True)
        os.replace(tmp, path)
        return path

    def export_inference(self, path: str | Path) -> Path:
        """An inference graph (input -> logits) with the current weights, for plain onnxruntime."""
        self.module.export_model_for_inferencing(str(path), ["logits"])
        return Path(path)
