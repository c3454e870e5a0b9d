"""`finetune`: the on-device loop. Loads artifacts, trains with progress, evaluates, checkpoints
atomically after every epoch, resumes, and writes inference.onnx for plain onnxruntime."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import ConfigError
from edgetrain.runtime import data as rdata
from edgetrain.runtime.trainer import OrtTrainer, load_manifest


@dataclass
class FinetuneConfig:
    artifacts: str
    data: str = "digits"  # 'digits', 'digits:shift=K', or an ImageFolder directory
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    out: str = "finetuned"
    seed: int = 0
    quiet: bool = False


def load_split(spec: str, size: int, classes: list[str], seed: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) preprocessed as the export's manifest says."""
    if spec.partition(":")[0] == "digits":
        x, y = rdata.digits_arrays(rdata.digits_shift(spec))
        have = [str(i) for i in range(10)]
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ConfigError(f"data {spec}: no such directory (use 'digits', 'digits:shift=K' or an ImageFolder dir)")
        x, y, have, _ = rdata.image_folder_arrays(path, size)
    if have != list(classes):
        raise ConfigError(
            f"data {spec} has classes {have[:5]}{'...' if len(have) > 5 else ''} but the artifacts were exported for "
            f"{list(classes)[:5]}{'...' if len(classes) > 5 else ''}: use data with the same class directories"
        )
    tr, te = rdata.split_indices(y, 0.2, seed)
    x = rdata.to_input(x, size)
    return x[tr], y[tr], x[te], y[te]


def evaluate(trainer: OrtTrainer, x: np.ndarray, y: np.ndarray, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) with the eval graph."""
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        lo, logits = trainer.eval_step(x[i : i + batch], y[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        loss += lo * len(logits)
    return correct / len(x), loss / len(x)


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune the artifacts in `cfg.artifacts` on `cfg.data`; state and results go to `cfg.out`."""
    out = Path(cfg.out)
    progress_file, ckpt = out / "progress.json", out / "checkpoint"
    if resume:
        if not progress_file.is_file():
            raise ConfigError(f"{out}: nothing to resume (no progress.json); start without --resume")
        saved = json.loads(progress_file.read_text())
        cfg = FinetuneConfig(**{**saved["config"], "quiet": cfg.quiet, "out": cfg.out, "epochs": cfg.epochs})
        saved["config"] = asdict(cfg)
    elif progress_file.exists():
        raise ConfigError(f"{out} already holds a fine-tuning run: use --resume or another --out")
    manifest = load_manifest(cfg.artifacts)
    size = manifest["input"]["shape"][-1]
    xtr, ytr, xte, yte = load_split(cfg.data, size, manifest["classes"], cfg.seed)
    trainer = OrtTrainer(cfg.artifacts, ckpt if resume else None)
    trainer.set_lr(cfg.lr)
    state = (
        saved
        if resume
        else {"config": asdict(cfg), "epoch": 0, "history": [], "before": evaluate(trainer, xte, yte)[0]}
    )
    out.mkdir(parents=True, exist_ok=True)
    steps = len(xtr) // cfg.batch_size
    if steps == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(xtr)} training images")
    from edgetrain.progress import Progress

    with Progress(cfg.epochs * steps, 0, quiet=cfg.quiet) as bar:
        bar.advance_to(state["epoch"] * steps)
        while state["epoch"] < cfg.epochs:
            order = np.random.default_rng(cfg.seed + state["epoch"]).permutation(len(xtr))
            t0, losses = time.perf_counter(), []
            for i in range(steps):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                losses.append(trainer.train_step(xtr[idx], ytr[idx])[0])
                bar.update(state["epoch"] * steps + i + 1, losses[-1], None)
            acc, test_loss = evaluate(trainer, xte, yte)
            state["epoch"] += 1
            state["history"].append({"epoch": state["epoch"], "loss": float(np.mean(losses)), "test_accuracy": acc,
                                     "test_loss": test_loss, "seconds": time.perf_counter() - t0})  # fmt: skip
            trainer.save(ckpt)
            _write_json(progress_file, state)
    trainer.export_inference(out / "inference.onnx")
    report = {"artifacts": cfg.artifacts, "data": cfg.data, "epochs": cfg.epochs, "before_accuracy": state["before"],
              "after_accuracy": state["history"][-1]["test_accuracy"] if state["history"] else state["before"],
              "history": state["history"], "inference_model": str(out / "inference.onnx")}  # fmt: skip
    _write_json(out / "report.json", report)
    return report


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
