"""Export: artifacts that load, train like PyTorch, and say what they hold."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.export.onnx import check_versions, export_artifacts, primitive_norms_
from edgetrain.models import create_model
from edgetrain.planning import Choices, Plan, apply_plan_
from edgetrain.runtime.trainer import OrtTrainer, sha256_file

SHAPE = (3, 16, 16)
CLASSES = [str(i) for i in range(10)]


def _gn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """cifar_resnet8 (BatchNorm) exported with its last stage and head trainable, both BN modes."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8")
    out = {}
    for bn in ("frozen", "batch"):
        d = tmp_path_factory.mktemp(f"art-{bn}")
        export_artifacts(copy.deepcopy(model), d, SHAPE, CLASSES, trainable="layers.2.*,fc", bn=bn)
        out[bn] = d
    return model, out


def test_manifest_lists_files_params_and_versions(exported):
    import json

    import onnx

    model, dirs = exported
    m = json.loads((dirs["frozen"] / "manifest.json").read_text())
    assert all(m["files"][n] == sha256_file(dirs["frozen"] / n) for n in m["files"])
    assert m["trainable"] and all(n.startswith(("layers.2.", "fc.")) for n in m["trainable"])
    assert "layers.0.conv1.weight" in m["frozen"] and m["input"]["shape"] == list(SHAPE)
    assert m["versions"]["onnx"] == onnx.__version__ and m["classes"] == CLASSES
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(str(dirs["frozen"] / name)).ir_version <= 10


def test_eval_model_with_batchnorm_loads_and_runs(exported):
    import onnx

    d = exported[1]["batch"]
    bns = [n for n in onnx.load(str(d / "eval_model.onnx")).graph.node if n.op_type == "BatchNormalization"]
    assert bns and all(len(n.output) == 1 for n in bns)  # onnxruntime rejects the training-mode outputs
    trainer = OrtTrainer(d)  # loads the eval graph into its session
    loss, logits = trainer.eval_step(np.random.randn(3, *SHAPE).astype(np.float32), np.zeros(3, np.int64))
    assert logits.shape == (3, 10) and np.isfinite(loss)


def _torch_reference(model, bn: str, trainable: list[str]):
    ref = copy.deepcopy(model)
    if bn == "frozen":
        primitive_norms_(ref, "frozen")
    ref.train()
    for n, p in ref.named_parameters():
        p.requires_grad_(n in trainable)
    return ref, torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)


@pytest.mark.parametrize("bn", ["frozen", "batch"])
def test_sgd_steps_match_pytorch(exported, bn):
    model, dirs = exported
    _steps_side_by_side(dirs[bn], model, bn, steps=4, seed=0)


def _steps_side_by_side(artifacts, model, bn: str, steps: int, seed: int) -> None:
    """SGD steps in onnxruntime and in PyTorch on the same batches: losses and trained weights agree."""
    ort = OrtTrainer(artifacts)
    ort.set_lr(0.05)
    ref, opt = _torch_reference(model, bn, ort.manifest["trainable"])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, y = rng.standard_normal((8, *SHAPE)).astype(np.float32), rng.integers(0, 10, 8)
        loss_ort, _ = ort.train_step(x, y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        assert loss_ort == pytest.approx(loss.item(), rel=1e-4)
    for name in ort.manifest["trainable"]:
        want = dict(ref.named_parameters())[name].detach().numpy()
        np.testing.assert_allclose(ort.parameter(name), want, rtol=1e-4, atol=1e-6)


def test_groupnorm_and_frozen_prefix_and_methods_left_out(tmp_path):
    torch.manual_seed(0)
    net = _gn_net()
    m = export_artifacts(copy.deepcopy(net), tmp_path / "gn", SHAPE, CLASSES)
    trainer = OrtTrainer(tmp_path / "gn")
    trainer.set_lr(0.05)
    ref, opt = _torch_reference(net, "batch", m["trainable"])
    x, y = np.random.default_rng(1).standard_normal((4, *SHAPE)).astype(np.float32), np.arange(4)
    loss_ort, _ = trainer.train_step(x, y)
    loss = nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y))
    assert loss_ort == pytest.approx(loss.item(), rel=1e-4)  # GroupNorm in primitive ops = nn.GroupNorm

    model = create_model("cifar_resnet8")
    plan = Plan(choices=Choices(["freeze:upto=stem"], {"layers.1": "checkpoint", "layers.2": "compress:bits=4"}))
    apply_plan_(model, plan)
    m = export_artifacts(model, tmp_path / "planned", SHAPE, CLASSES, plan=plan.to_dict())
    assert m["methods_not_in_graph"] == ["checkpoint", "compress"]
    assert not any(n.startswith("stem.") for n in m["trainable"]) and "stem.0.weight" in m["frozen"]
    assert "layers.1.conv1.weight" in m["trainable"]


def test_bad_export_requests_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="matches no parameter"):
        export_artifacts(create_model("cifar_resnet8"), tmp_path / "x", SHAPE, CLASSES, trainable="nothing.*")

    class Newer:
        ir_version = 11

    with pytest.raises(ConfigError, match="IR version 11.*onnx==1.17.0"):
        check_versions(Newer(), "model.onnx")


def test_low_rank_model_exports_and_trains_like_pytorch(tmp_path):
    """Tucker-2 with one factor trained, and CP with re-fusion switched off for the graph."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8")
    plan = Plan(choices=Choices(["tucker2:ratio=0.5", "partial:factor=core"], {"layers.2": "checkpoint"}))
    apply_plan_(model, plan)
    m = export_artifacts(copy.deepcopy(model), tmp_path / "lr", SHAPE, CLASSES, bn="batch", plan=plan.to_dict())
    assert "layers.1.conv1.core.weight" in m["trainable"] and "layers.1.conv1.first.weight" in m["frozen"]
    _steps_side_by_side(tmp_path / "lr", model, "batch", steps=3, seed=2)

    cp = create_model("cifar_resnet8")
    apply_plan_(cp, Choices(["cp:refuse=true,iters=2"]))
    m = export_artifacts(cp, tmp_path / "cp", SHAPE, CLASSES)
    assert "cp refuse" in m["methods_not_in_graph"]
    x = np.random.default_rng(3).standard_normal((2, *SHAPE)).astype(np.float32)
    _, logits = OrtTrainer(tmp_path / "cp").eval_step(x, np.zeros(2, np.int64))
    cp.eval()
    np.testing.assert_allclose(logits, cp(torch.from_numpy(x)).detach().numpy(), rtol=1e-3, atol=1e-4)
