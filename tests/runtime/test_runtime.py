"""The on-device runtime: no torch, same preprocessing as training, resume, inference export, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetrain.export.onnx import export_artifacts
from edgetrain.models import create_model
from edgetrain.runtime import data as rdata
from edgetrain.runtime.finetune import FinetuneConfig, finetune
from edgetrain.runtime.trainer import OrtTrainer

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("art")
    export_artifacts(create_model("cifar_resnet8"), d, (3, 16, 16), CLASSES, trainable="layers.2.*,fc")
    return d


def test_preprocessing_matches_the_torch_pipeline(tmp_path):
    from PIL import Image

    from edgetrain.train.data import digits, image_folder

    t = digits(16, seed=0)
    xtr, ytr, xte, yte = _split_digits(16)
    np.testing.assert_allclose(xtr, t.train.tensors[0].numpy(), atol=1e-5)
    assert np.array_equal(yte, t.test.tensors[1].numpy())
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 13, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    x, y, classes, bad = rdata.image_folder_arrays(tmp_path, 12)
    tr, _ = rdata.split_indices(y, 0.2, 0)
    want = image_folder(tmp_path, 12, 0).train.tensors[0].numpy()
    np.testing.assert_allclose(rdata.to_input(x, 12)[tr], want, atol=1e-5)
    assert classes == ["a", "b"] and bad == []


def _split_digits(size: int):
    from edgetrain.runtime.finetune import load_split

    return load_split("digits", size, CLASSES, 0)


@pytest.mark.parametrize("torch_blocked", [True, False], ids=["torch-blocked", "torch-installed"])
def test_the_runtime_never_imports_torch(artifacts, tmp_path, torch_blocked):
    """The board has no torch, and where torch is installed the runtime must not load it either
    (`import onnxruntime` would, through ortmodule: 865 MB of RSS instead of 306 MB)."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("blocked: " + name)
if {torch_blocked!r}:
    sys.meta_path.insert(0, Block())
from edgetrain.cli.main import main
rc = main(["finetune", {str(artifacts)!r}, "--epochs", "1", "--out", {str(tmp_path / "ft")!r}, "--json"])
assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules), "torch was imported"
sys.exit(rc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["epochs"] == 1 and (tmp_path / "ft" / "inference.onnx").is_file()
    assert "CUDA_HOME" not in proc.stderr


def test_resume_continues_to_the_same_weights(artifacts, tmp_path):
    a = finetune(FinetuneConfig(str(artifacts), epochs=2, out=str(tmp_path / "a"), quiet=True))
    finetune(FinetuneConfig(str(artifacts), epochs=1, out=str(tmp_path / "b"), quiet=True))
    b = finetune(FinetuneConfig(str(artifacts), epochs=2, out=str(tmp_path / "b"), quiet=True), resume=True)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6)
    ta = OrtTrainer(artifacts, tmp_path / "a" / "checkpoint")
    tb = OrtTrainer(artifacts, tmp_path / "b" / "checkpoint")
    np.testing.assert_allclose(ta.parameter("fc.weight"), tb.parameter("fc.weight"), rtol=1e-6)


def test_inference_model_runs_in_plain_onnxruntime(artifacts, tmp_path):
    import onnxruntime as ort

    finetune(FinetuneConfig(str(artifacts), epochs=1, out=str(tmp_path / "ft"), quiet=True))
    trainer = OrtTrainer(artifacts, tmp_path / "ft" / "checkpoint")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    _, want = trainer.eval_step(x, np.zeros(4, np.int64))
    got = ort.InferenceSession(str(tmp_path / "ft" / "inference.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_clear_line(artifacts, tmp_path, cli):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifacts, broken)
    (broken / "checkpoint").write_bytes(b"garbage")
    code, _, err = cli("finetune", str(broken), "--out", str(tmp_path / "o1"))
    assert code == 2 and "checksum does not match" in err
    (broken / "checkpoint").unlink()
    code, _, err = cli("finetune", str(broken), "--out", str(tmp_path / "o2"))
    assert code == 2 and "artifact checkpoint is missing" in err
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "0.png")
    code, _, err = cli("finetune", str(artifacts), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o3"))
    assert code == 2 and "classes ['cat'] but the artifacts were exported for" in err
    code, _, err = cli("finetune", str(tmp_path / "nothing"), "--out", str(tmp_path / "o4"))
    assert code == 2 and "no manifest.json" in err
    for spec, message in [("digits:foo=1", "digits takes one option, shift=K"),
                          ("digits:shift=x", "shift must be a whole number"), ("digits:shift=9", "0-7 pixels")]:  # fmt: skip
        code, _, err = cli("finetune", str(artifacts), "--data", spec, "--out", str(tmp_path / "o5"))
        assert code == 2 and message in err, err
    _truncate_with_matching_manifest(broken := tmp_path / "trunc", artifacts)
    code, _, err = cli("finetune", str(broken), "--out", str(tmp_path / "o6"))
    assert code == 2 and "the artifacts cannot be loaded" in err and "export them again" in err
    from edgetrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"shape \(2, 3, 8, 8\) does not match the artifacts' \(N, 3, 16, 16\)"):
        OrtTrainer(artifacts).train_step(np.zeros((2, 3, 8, 8), np.float32), np.zeros(2, np.int64))


def test_export_and_finetune_from_the_cli(tmp_path, cli):
    from edgetrain.train.recipe import FitConfig, fit

    fit(FitConfig(device="cpu", model="cifar_resnet8", input_size=16, batch_size=32, epochs=1, max_steps=3,
                  out=str(tmp_path / "run"), quiet=True))  # fmt: skip
    code, out, err = cli("export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "art"),
                         "--trainable", "fc", "--json")  # fmt: skip
    assert code == 0, err
    m = json.loads(out)
    assert m["trainable"] == ["fc.weight", "fc.bias"] and m["input"]["shape"] == [3, 16, 16]
    code, out, err = cli("finetune", str(tmp_path / "art"), "--epochs", "1", "--out", str(tmp_path / "ft"), "--json")
    assert code == 0, err
    assert json.loads(out)["history"][0]["epoch"] == 1


def _truncate_with_matching_manifest(dest: Path, artifacts: Path) -> None:
    """A half-copied training graph whose manifest checksum was (wrongly) made from it."""
    import shutil

    from edgetrain.runtime.trainer import sha256_file

    shutil.copytree(artifacts, dest)
    f = dest / "training_model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["training_model.onnx"] = sha256_file(f)
    (dest / "manifest.json").write_text(json.dumps(manifest))
