"""Low-rank layers (issue 6), side by side in one run:

    .venv/bin/python bench/lowrank.py [--quick] [--only refusion|partial|scratch|convert]

1. refusion: T1000 on a VGG-style (vgg11) and an AlexNet-style (alexnet) net: the CP layers'
   saved intermediates, unfused vs re-fused (depthwise recomputed; everything recomputed), beside
   T1000's -84.6 % / -77.4 %; step time re-fused vs unfused vs the original (T1000: 1.77x / 1.4x).
2. partial: Facto-CNN single-factor update: saved feature-map bytes against full training of the
   same Tucker-2 model and against the original (paper: 68-93 % less), alone and with its
   value-similarity compression.
3. scratch: digits accuracy, Tucker-2 from scratch (ELRT) with each regularizer at 2x and 4x
   FLOP reduction vs the full-rank net, fixed seeds.
4. convert: a trained resnet18 converted to Tucker-2 (HOSVD), its error and accuracy before and
   after fine-tuning (all factors, or one) vs the original.
Every configuration: parameters, forward FLOPs, measured peak and the estimate's error.
Writes bench/out/lowrank.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from compression import seeded_accuracies
from timing import interleaved_times, layer_times
from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.memory.measure import model_counts, tracked_step
from edgetrain.methods.base import prepare
from edgetrain.methods.lowrank_layers import CPConv2d
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.recipe import FitConfig, fit

OUT = Path(__file__).parent / "out"
MiB = 2**20


def measure(model: nn.Module, methods: list[str], shape, batch: int) -> dict:
    """Params, FLOPs, saved bytes and peak of one real step, and the estimate's error against it;
    "model" is the prepared model itself (the step ran on a copy)."""
    m, _, settings = prepare(model, methods)
    rep = tracked_step(m, StepSpec(shape, batch, 10, settings=settings), fake=False)
    pred = estimate(model, shape, batch, methods=methods).predicted.peak_total_bytes
    return {"model": m, "settings": settings, "params": sum(p.numel() for p in m.parameters()),
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad), "flops": model_counts(m, shape)["forward_flops"],
            "saved": rep.saved_activation_bytes, "peak": rep.peak_bytes, "est_err": pred / rep.peak_bytes - 1}  # fmt: skip


def _line(label: str, r: dict, extra: str = "") -> None:
    print(f"   {label:<34} {r['params'] / 1e6:>7.2f}M {r['flops'] / 1e6:>9.1f}M {r['saved'] / MiB:>9.2f} "
          f"{r['peak'] / MiB:>9.2f} {r['est_err']:>+7.2%} {extra}")  # fmt: skip


HEAD = f"   {'configuration':<34} {'params':>8} {'FLOPs':>10} {'saved MiB':>9} {'peak MiB':>9} {'est err':>7}"


def refusion_table(quick: bool) -> list[dict]:
    print(
        "\n1. T1000 re-fusion: CP layers (ratio 0.5 of each conv's FLOPs), 64 px, batch 8; times interleaved, medians"
        "\n   (step s: the whole step; CP s: forward + backward of the CP layers alone, summed)"
    )
    paper = {"alexnet": (-0.846, 1.77), "vgg11": (-0.774, 1.4)}
    rows = []
    for name in ("alexnet", "vgg11"):
        print(f" {name}-style (T1000: intermediates {paper[name][0]:+.1%}, {paper[name][1]}x faster than unfused)")
        print(HEAD + f" {'CP interm. MiB':>14} {'vs unfused':>10} {'step s':>7} {'x orig':>7} {'x unfused':>9}"
              f" {'CP s':>7} {'x unfused':>9}")  # fmt: skip
        model = create_model(name)
        shape, batch = (3, 64, 64), 8
        configs = [("original", []), ("cp unfused", ["cp:init=random"]),
                   ("cp unfused, channels-last model", ["cp:init=random"]),
                   ("cp re-fused (depthwise recomputed)", ["cp:refuse=true,init=random"]),
                   ("cp re-fused (all recomputed)", ["cp:refuse=true,init=random,recompute=all"])]  # fmt: skip
        res = [measure(model, methods, shape, batch) for _, methods in configs]
        res[2]["model"] = res[2]["model"].to(memory_format=torch.channels_last)  # the layout the re-fused chain uses
        secs = interleaved_times([(r["model"], StepSpec(shape, batch, 10)) for r in res], 3 if quick else 9)
        cp = [0.0] + layer_times([r["model"] for r in res[1:]], CPConv2d, shape, batch, 3 if quick else 9)
        inter = [r["saved"] - res[0]["saved"] for r in res]  # the CP chains' own saved tensors
        for (label, _), r, s, c, i in zip(configs, res, secs, cp, inter, strict=True):
            row = {"net": name, "config": label, **_plain(r),
                   "intermediate": i, "seconds": s, "vs_unfused_bytes": i / inter[1] - 1 if inter[1] else None,
                   "x_original": s / secs[0], "speedup_vs_unfused": secs[1] / s,
                   "cp_seconds": c, "cp_speedup_vs_unfused": cp[1] / c if c else None}  # fmt: skip
            rows.append(row)
            vs = f"{row['vs_unfused_bytes']:+.1%}" if label.startswith("cp re") else "-"
            cps = f"{c:>7.3f} {cp[1] / c:>9.2f}" if c else f"{'-':>7} {'-':>9}"
            _line(label, r, f"{i / MiB:>14.2f} {vs:>10} {s:>7.3f} {s / secs[0]:>7.2f} {secs[1] / s:>9.2f} {cps}")
    return rows


def partial_table(quick: bool) -> list[dict]:
    print("\n2. Facto-CNN single-factor update: Tucker-2 ratio 0.5; saved feature maps of one real step")
    rows = []
    for name, shape, batch in (("resnet18", (3, 64, 64), 16), ("vgg11_bn", (3, 64, 64), 8)):
        print(f" {name} {shape[-1]} px b{batch}")
        print(HEAD + f" {'trainable':>10} {'x original':>10} {'x factorized':>12} {'step s':>7} {'x orig':>7}")
        model = create_model(name)
        low = ["tucker2:init=random"]
        similar = "compress:scheme=similar,bits=2,relu=mask"
        configs = [("original", []), ("original + base+delta", [similar]), ("tucker2, all factors", low)]
        configs += [(f"tucker2, train {f} only", [*low, f"partial:factor={f}"]) for f in ("first", "core", "last")]
        configs += [
            ("tucker2 re-fused, all factors", ["tucker2:init=random,refuse=true"]),
            ("tucker2 re-fused, train core only", ["tucker2:init=random,refuse=true", "partial:factor=core"]),
        ]
        configs += [("tucker2, train core + base+delta", [*low, "partial:factor=core", similar])]
        res = [measure(model, methods, shape, batch) for _, methods in configs]
        steps = [(r["model"], StepSpec(shape, batch, 10, settings=r["settings"])) for r in res]
        secs = interleaved_times(steps, 2 if quick else 5)
        for (label, _), r, sec in zip(configs, res, secs, strict=True):
            rows.append({"net": name, "config": label, **_plain(r), "seconds": sec, "x_time": sec / secs[0]})
        case = rows[-len(configs) :]
        for row in case:
            row["x_original"] = row["saved"] / case[0]["saved"]
            row["x_factorized"] = row["saved"] / case[2]["saved"]
            _line(
                row["config"],
                row,
                f"{row['trainable'] / 1e6:>9.2f}M {row['x_original']:>10.3f} {row['x_factorized']:>12.3f} "
                f"{row['seconds']:>7.3f} {row['x_time']:>7.2f}",
            )
    return rows


def scratch_table(seeds: list[int], epochs: int) -> list[dict]:
    print(f"\n3. digits, cifar_resnet20 from scratch, {epochs} epochs at 32 px, seeds {seeds}: Tucker-2 (ELRT)")
    print(HEAD + f" {'accuracy (mean, min-max)':>26} {'vs full':>8}")
    shape, rows = (3, 32, 32), []
    configs = [("full rank", [])]
    for ratio in (0.5, 0.25):
        for reg in ("none", "so", "dso", "srip", "mc"):
            configs.append(
                (f"{1 / ratio:.0f}x fewer FLOPs, reg {reg}", [f"tucker2:ratio={ratio},init=random,reg={reg}"])
            )
    for label, methods in configs:
        r = measure(create_model("cifar_resnet20"), methods, shape, 64)
        accs = seeded_accuracies(methods, seeds, epochs, f"lowrank-{len(rows)}")
        row = {"config": label, "methods": methods, "accuracies": accs, "mean": statistics.mean(accs),
               **{k: v for k, v in r.items() if k not in ("model", "settings")}}  # fmt: skip
        row["vs_full"] = row["mean"] - (rows[0]["mean"] if rows else row["mean"])
        rows.append(row)
        _line(label, row, f"{row['mean']:>10.2%} ({min(accs):.2%}-{max(accs):.2%}) {row['vs_full'] * 100:>+8.2f}")
    return rows


def convert_table(epochs: int, tune_epochs: int) -> list[dict]:
    print(
        f"\n4. resnet18 trained {epochs} epochs on digits (32 px), converted by HOSVD, fine-tuned {tune_epochs} epochs"
    )
    print(HEAD + f" {'weight err':>10} {'logits err':>10} {'acc. converted':>14} {'acc. tuned':>10}")
    shape = (3, 32, 32)
    out = OUT / "runs" / f"lowrank-dense-{int(time.time() * 1000)}"
    dense = fit(FitConfig(device="cpu", model="resnet18", epochs=epochs, out=str(out), quiet=True))
    weights = out / "model.pt"
    model = create_model("resnet18", 10, weights)
    r = measure(model, [], shape, 64)
    rows = [{"config": "original", "accuracy": dense["test_accuracy"], **_plain(r)}]
    _line("original", r, f"{'-':>10} {'-':>10} {'-':>14} {dense['test_accuracy']:>10.2%}")
    for label, methods in (("tucker2 ratio 0.5", ["tucker2:ratio=0.5"]), ("tucker2 ratio 0.25", ["tucker2:ratio=0.25"]),
                           ("tucker2 energy 0.9", ["tucker2:energy=0.9"]),
                           ("tucker2 ratio 0.5, train core only", ["tucker2:ratio=0.5", "partial:factor=core"])):  # fmt: skip
        r = measure(model, methods, shape, 64)
        run = OUT / "runs" / f"lowrank-conv-{len(rows)}-{int(time.time() * 1000)}"
        tuned = fit(FitConfig(device="cpu", model="resnet18", epochs=tune_epochs, out=str(run), quiet=True,
                              init=str(weights), methods=methods, lr=0.01))  # fmt: skip
        low = tuned["lowrank"]
        werr = statistics.median(v["weight_error"] for v in low["layers"].values())
        acc0 = _accuracy_now(r["model"])
        rows.append({"config": label, "weight_error_median": werr, "logits_error": low["logits_error"],
                     "accuracy_converted": acc0, "accuracy": tuned["test_accuracy"], **_plain(r)})  # fmt: skip
        _line(label, r, f"{werr:>10.3f} {low['logits_error']:>10.3f} {acc0:>14.2%} {tuned['test_accuracy']:>10.2%}")
    return rows


def _plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("model", "settings")}


@torch.no_grad()
def _accuracy_now(converted: nn.Module) -> float:
    """Test accuracy of the converted model before any training (BatchNorm statistics as trained)."""
    from edgetrain.train.data import load_data

    m = converted.eval()
    _, test = load_data("digits", 32, 0).loaders(256, 0)
    hits = sum((m(x).argmax(1) == y).sum().item() for x, y in test)
    return hits / len(test.dataset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("refusion", "partial", "scratch", "convert"))
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    tables = {
        "refusion": lambda: refusion_table(args.quick),
        "partial": lambda: partial_table(args.quick),
        "scratch": lambda: scratch_table([0] if args.quick else [0, 1], 1 if args.quick else 4),
        "convert": lambda: convert_table(1 if args.quick else 4, 1 if args.quick else 2),
    }
    result = {name: fn() for name, fn in tables.items() if args.only in (None, name)}
    suffix = f"_{args.only}" if args.only else ""
    (OUT / f"lowrank{suffix}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
