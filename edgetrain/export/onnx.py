"""`export_artifacts`: a model (after a plan's structural methods) as onnxruntime-training artifacts.

Writes training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint and manifest.json
into one directory. The board loads them with `edgetrain.runtime` (onnxruntime-training and
numpy only). Custom-autograd methods (checkpointing, compression, reversible) cannot be traced:
`set_exportable` switches them off and the manifest says which were left out.

BatchNorm: `bn="frozen"` (default) exports it with its running statistics in both graphs, so
fine-tuning on the board trains its scale and shift (where `--trainable` names them) but never
moves its statistics; `bn="batch"` trains with batch statistics, like PyTorch's train mode, and
the eval graph keeps the exported running statistics (the runtime cannot update them).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.methods.base import set_exportable
from edgetrain.runtime.data import MEAN, STD
from edgetrain.runtime.trainer import ARTIFACTS, sha256_file

MAX_IR_VERSION = 10  # what onnxruntime-training 1.19.2 loads
OPSET = 17


def trainable_names(model: nn.Module, patterns: str | None) -> list[str]:
    """Parameter names that train on the board: those matching any comma-separated pattern
    ('layer4.*,fc' or prefixes 'layer4,fc'), among those not frozen already; all when None."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatch(n, p) or n.startswith(p.rstrip(".*") + ".") for p in pats)]
    if not chosen:
        raise ConfigError(f"--trainable '{patterns}' matches no parameter; names look like {names[0]}, {names[-1]}")
    return chosen


class _FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its running statistics, in primitive ops: trainable scale and shift, fixed
    statistics, and no BatchNormalization node for the exporter to fuse into the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        scale = self.weight / torch.sqrt(self.running_var + self.eps)  # (C,)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class _PrimitiveGroupNorm(nn.GroupNorm):
    """GroupNorm in primitive ops: onnxruntime has no gradient for InstanceNormalization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        n, c = x.shape[:2]
        g = x.reshape(n, self.num_groups, -1)  # (N, G, C/G * H * W)
        mean = g.mean(dim=2, keepdim=True)
        var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def primitive_norms_(model: nn.Module, bn: str) -> None:
    """Swap norms for their primitive-op forms (same parameter names): GroupNorm always,
    BatchNorm when its statistics stay frozen (`bn='frozen'`)."""
    for m in model.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = _PrimitiveGroupNorm
        elif type(m) is nn.BatchNorm2d and bn == "frozen":
            m.__class__ = _FrozenBatchNorm


def _export_graph(model: nn.Module, path: Path, input_shape: tuple[int, int, int], bn: str) -> None:
    primitive_norms_(model, bn)
    model.train()
    x = torch.randn(2, *input_shape)
    torch.onnx.export(
        model, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=False,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False, export_params=True, opset_version=OPSET,
    )  # fmt: skip


@contextlib.contextmanager
def _quiet_native_output():
    """onnxruntime's gradient builder logs every graph pass from C++ to stderr, and the TorchScript
    exporter warns about BatchNorm counters it drops: hold both back, replay them on failure."""
    sys.stderr.flush()
    saved, log = os.dup(2), tempfile.TemporaryFile()
    os.dup2(log.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        os.dup2(saved, 2)
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-4000:])
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.close()


def check_versions(model: Any, where: str) -> None:
    """Fail clearly when the installed onnx wrote what onnxruntime-training 1.19.2 rejects."""
    if model.ir_version > MAX_IR_VERSION:
        import onnx

        raise ConfigError(
            f"{where}: ONNX IR version {model.ir_version} (onnx {onnx.__version__}) is newer than onnxruntime-training "
            f"1.19.2 loads (IR <= {MAX_IR_VERSION}): install onnx==1.17.0 (`pip install -c constraints.txt '.[onnx]'`)"
        )


def _strip_bn_training_outputs(path: Path) -> int:
    """The eval graph's BatchNormalization nodes keep training-mode outputs onnxruntime rejects."""
    import onnx

    m = onnx.load(str(path))
    n = 0
    for node in m.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            del node.output[1:]
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
            n += 1
    onnx.save(m, str(path))
    return n


def export_artifacts(
    model: nn.Module,
    out: str | Path,
    input_shape: tuple[int, int, int],
    classes: list[str],
    trainable: str | None = None,
    loss: str = "ce",
    optimizer: str = "sgd",
    bn: str = "frozen",
    plan: dict | None = None,
) -> dict[str, Any]:
    """Write the artifacts and manifest to `out`; returns the manifest. `model` itself is changed
    (methods switched off, norms in primitive ops): pass a copy to keep using it."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    if loss not in ("ce", "mse") or optimizer not in ("sgd", "adamw") or bn not in ("frozen", "batch"):
        raise ConfigError(f"loss ce|mse, optimizer sgd|adamw, bn frozen|batch; got {loss}, {optimizer}, {bn}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    left_out = set_exportable(model)
    requires_grad = trainable_names(model, trainable)
    base = out / "base_model.onnx"
    with _quiet_native_output():
        _export_graph(model, base, input_shape, bn)
    graph = onnx.load(str(base))
    check_versions(graph, str(base))
    initializers = [i.name for i in graph.graph.initializer]
    missing = [n for n in requires_grad if n not in initializers]
    if missing:
        raise ConfigError(
            f"parameters {missing[:3]} are not in the exported graph: they cannot be trained on the board"
        )
    with _quiet_native_output():
        artifacts.generate_artifacts(
            graph, requires_grad=requires_grad, frozen_params=[n for n in initializers if n not in requires_grad],
            loss=artifacts.LossType.CrossEntropyLoss if loss == "ce" else artifacts.LossType.MSELoss,
            optimizer=artifacts.OptimType.SGD if optimizer == "sgd" else artifacts.OptimType.AdamW,
            artifact_directory=str(out), additional_output_names=["logits"],
        )  # fmt: skip
    base.unlink()
    _strip_bn_training_outputs(out / "eval_model.onnx")
    for name in ARTIFACTS[:3]:
        check_versions(onnx.load(str(out / name)), str(out / name))
    manifest = _manifest(
        model, out, input_shape, classes, requires_grad, initializers, loss, optimizer, bn, plan, left_out
    )
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _manifest(model, out, input_shape, classes, requires_grad, initializers, loss, optimizer, bn, plan, left_out):
    import onnx
    import onnxruntime

    methods = ((plan or {}).get("choices") or {}).get("methods", [])  # a plan's to_dict()
    structural = sorted({m for m in methods if m.split(":")[0] in ("freeze",)})
    return {
        "format": 1,
        "input": {
            "name": "input",
            "shape": list(input_shape),
            "layout": "NCHW",
            "dtype": "float32",
            "batch": "dynamic",
        },  # fmt: skip
        "output": "logits",
        "normalization": {
            "mean": list(MEAN),
            "std": list(STD),
            "resize": "bilinear, half-pixel centres",
            "range": "pixels / 255 (digits: / 16) before normalizing",
        },  # fmt: skip
        "classes": list(classes),
        "trainable": requires_grad,
        "frozen": [n for n in initializers if n not in requires_grad],
        "batchnorm": bn,
        "loss": loss,
        "optimizer": optimizer,
        "methods_in_graph": structural,
        "methods_not_in_graph": left_out,
        "plan": plan,
        "versions": {
            "edgetrain": _version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },  # fmt: skip
        "files": {name: sha256_file(out / name) for name in ARTIFACTS},
    }


def _version() -> str:
    from edgetrain import __version__

    return __version__
