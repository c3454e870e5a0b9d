"""On-device fine-tuning (issue 9): export, the torch-free runtime, parity with PyTorch, memory.

    .venv/bin/python bench/runtime.py

1. A digits-trained cifar_resnet20 (fit, 32 px) exported with its last stage and head trainable,
   fine-tuned on the runtime on shifted digits (every 8x8 image moved 1 pixel right and down,
   a distribution the base model did not see): test accuracy before and after.
2. Parity: the same initial weights and batches, 10 SGD steps in onnxruntime-training and in
   PyTorch: the largest relative difference of the losses and of the trained weights.
3. Peak resident memory of a training step, runtime vs PyTorch, same model and batch, each in
   a fresh process (VmHWM), as a ratio.
Writes bench/out/runtime.json.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetrain.export.onnx import export_artifacts, primitive_norms_
from edgetrain.models import create_model
from edgetrain.runtime.finetune import FinetuneConfig, finetune, load_split
from edgetrain.runtime.trainer import OrtTrainer
from edgetrain.train.recipe import FitConfig, fit

OUT = Path(__file__).parent / "out" / "runtime"
CLASSES = [str(i) for i in range(10)]


def finetune_table() -> dict:
    shutil.rmtree(OUT, ignore_errors=True)
    base = fit(FitConfig(device="cpu", model="cifar_resnet20", epochs=4, out=str(OUT / "base"), quiet=True))
    from edgetrain.cli.main import main

    assert (
        main(
            ["export", "--run", str(OUT / "base"), "--out", str(OUT / "art"), "--trainable", "layers.8.*,fc", "--json"]
        )
        == 0
    )
    trainer = OrtTrainer(OUT / "art")
    from edgetrain.runtime.finetune import evaluate

    _, _, xte, yte = load_split("digits", 32, CLASSES, 0)
    plain_acc = evaluate(trainer, xte, yte)[0]
    r = finetune(
        FinetuneConfig(str(OUT / "art"), data="digits:shift=1", epochs=3, lr=0.02, out=str(OUT / "ft"), quiet=True)
    )
    print("\n1. fine-tuning on the runtime (cifar_resnet20 trained 4 epochs on digits; layers.8 + fc trainable)")
    print(
        f"   base model, digits test split:           {base['test_accuracy']:.2%} (PyTorch) / {plain_acc:.2%} (runtime eval graph)"
    )
    print(f"   shifted digits, before fine-tuning:      {r['before_accuracy']:.2%}")
    print(
        f"   shifted digits, after 3 epochs on board: {r['after_accuracy']:.2%}  ({sum(h['seconds'] for h in r['history']):.1f} s)"
    )
    return {"base": base["test_accuracy"], "runtime_eval": plain_acc, "before": r["before_accuracy"], "after": r["after_accuracy"],
            "history": r["history"]}  # fmt: skip


def parity_table(steps: int = 10) -> list[dict]:
    print(f"\n2. parity: {steps} SGD steps (lr 0.05, batch 16, 32 px), onnxruntime-training vs PyTorch")
    rows = []
    for bn in ("frozen", "batch"):
        torch.manual_seed(0)
        model = create_model("cifar_resnet20")
        d = OUT / f"parity-{bn}"
        m = export_artifacts(copy.deepcopy(model), d, (3, 32, 32), CLASSES, trainable="layers.7.*,layers.8.*,fc", bn=bn)
        ort = OrtTrainer(d)
        ort.set_lr(0.05)
        ref = copy.deepcopy(model)
        if bn == "frozen":
            primitive_norms_(ref, "frozen")
        for n, p in ref.named_parameters():
            p.requires_grad_(n in m["trainable"])
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
        rng, loss_err = np.random.default_rng(0), 0.0
        for _ in range(steps):
            x, y = rng.standard_normal((16, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 16)
            lo, _ = ort.train_step(x, y)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
            loss_err = max(loss_err, abs(lo - loss.item()) / abs(loss.item()))
        params = dict(ref.named_parameters())
        w_err = max(float(np.abs(ort.parameter(n) - params[n].detach().numpy()).max() / (np.abs(params[n].detach().numpy()).max() + 1e-12))
                    for n in m["trainable"])  # fmt: skip
        rows.append({"batchnorm": bn, "loss_rel_err": loss_err, "weight_rel_err": w_err})
        print(f"   BatchNorm {bn:<7} loss {loss_err:.1e}  weights {w_err:.1e}  (target 1e-4)")
    return rows


_RUNTIME_STEP = """
import json, sys, numpy as np
from edgetrain.runtime.trainer import OrtTrainer
from edgetrain.memory.process import peak_rss_bytes
t = OrtTrainer(sys.argv[1]); t.set_lr(0.05)
x, y = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32), np.arange(64) % 10
for _ in range(3): t.train_step(x, y)
print(json.dumps({"peak": peak_rss_bytes(), "torch": "torch" in sys.modules}))
"""
_TORCH_STEP = """
import json, torch
from edgetrain.models import create_model
from edgetrain.memory.process import peak_rss_bytes
m = create_model("cifar_resnet20"); opt = torch.optim.SGD(m.parameters(), lr=0.05)
x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % 10
for _ in range(3):
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
print(json.dumps({"peak": peak_rss_bytes()}))
"""
_BLOCK = "import importlib.abc, sys\nclass B(importlib.abc.MetaPathFinder):\n    def find_spec(self, n, p, t=None):\n        if n.split('.')[0] in ('torch', 'torchvision'): raise ImportError(n)\nsys.meta_path.insert(0, B())\n"


def memory_table() -> dict:
    d = OUT / "mem"
    export_artifacts(create_model("cifar_resnet20"), d, (3, 32, 32), CLASSES, bn="batch")  # every parameter trains
    run = lambda code, *a: json.loads(
        subprocess.run(
            [sys.executable, "-c", code, *a], capture_output=True, text=True, check=True
        ).stdout.splitlines()[-1]
    )  # noqa: E731
    rt, installed, pt = run(_BLOCK + _RUNTIME_STEP, str(d)), run(_RUNTIME_STEP, str(d)), run(_TORCH_STEP)
    assert not installed["torch"], "the runtime imported torch"
    print(
        "\n3. peak resident memory of a training step (cifar_resnet20, batch 64, 32 px, all parameters, fresh processes)"
    )
    print(f"   runtime (onnxruntime-training, no torch): {rt['peak'] / 2**20:.0f} MiB")
    print(f"   runtime, torch installed (not imported):  {installed['peak'] / 2**20:.0f} MiB")
    print(f"   PyTorch:                                  {pt['peak'] / 2**20:.0f} MiB")
    print(f"   ratio runtime / PyTorch:                  {rt['peak'] / pt['peak']:.2f}")
    return {"runtime": rt["peak"], "runtime_torch_installed": installed["peak"], "pytorch": pt["peak"],
            "ratio": rt["peak"] / pt["peak"]}  # fmt: skip


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"finetune": finetune_table(), "parity": parity_table(), "memory": memory_table()}
    (OUT.parent / "runtime.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
