"""The training recipe on real data: accuracy that tells the truth (issue: stale BatchNorm statistics).

    .venv/bin/python bench/recipe.py [--quick]

Three cases, each run twice from the same code: as shipped ("precise BN": BatchNorm statistics
re-estimated for the current weights before every evaluation and save), and with that step
switched off ("stale BN": the running statistics training left, as before the fix):
- the sample photos: an ImageFolder of 64x64 JPEG patches cut from scikit-learn's two bundled
  photos (2 classes, 300 images; built here, nothing downloaded), `edgetrain fit --data DIR
  --device cpu` with the defaults, seeds 0-2;
- `make run`: the embedded digits on gtx750-1gb with the defaults (epoch-1 and final accuracy);
- mobilenet_v2, batch 128 at 64 px, 2 epochs on gtx750-1gb (a checkpointed plan).
Prints a table, writes bench/recipe.txt (via tee) and bench/out/recipe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import edgetrain.train.recipe as recipe_mod
from edgetrain.train.data import write_sample_photos
from edgetrain.train.recipe import FitConfig, fit

OUT = Path(__file__).parent / "out"


def _run(cfg: FitConfig, stale: bool) -> dict:
    off = mock.patch.object(recipe_mod, "recalibrate_bn_", lambda *a, **k: 0) if stale else contextlib.nullcontext()
    t0 = time.perf_counter()
    with off:
        r = fit(cfg)
    return {"accuracy": r["test_accuracy"], "by_epoch": r["accuracy_by_epoch"], "plan": r["plan"],
            "recoveries": r["recoveries"], "learned": r["learned"], "seconds": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="photos seed 0 only, no mobilenet_v2")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgetrain-recipe-"))
    photos = write_sample_photos(tmp / "photos")
    cases = [
        (f"photos seed {s}", dict(device="cpu", data=str(photos), seed=s)) for s in ((0,) if args.quick else (0, 1, 2))
    ]
    cases.append(("make run (digits)", dict(device="gtx750-1gb")))
    if not args.quick:
        cases.append(("mobilenet_v2 b128 64px 2 ep", dict(device="gtx750-1gb", model="mobilenet_v2", batch_size=128,
                                                           input_size=64, epochs=2)))  # fmt: skip
    rows = []
    print(f"{'case':<30} {'BN':<8} {'plan':<26} {'epoch 1':>8} {'final':>8} {'recov':>6} {'learned':>8} {'time s':>7}")
    for name, kw in cases:
        for stale in (True, False):
            out = str(tmp / f"{name.replace(' ', '_')}-{stale}")
            r = _run(FitConfig(**kw, out=out, quiet=True), stale)
            rows.append({"case": name, "bn": "stale" if stale else "precise", **r})
            print(f"{name:<30} {rows[-1]['bn']:<8} {r['plan'][:26]:<26} {r['by_epoch'][0]:>8.2%} {r['accuracy']:>8.2%} "
                  f"{r['recoveries']:>6} {r['learned']!s:>8} {r['seconds']:>7.0f}", flush=True)  # fmt: skip
    photo = [r["accuracy"] for r in rows if r["case"].startswith("photos") and r["bn"] == "precise"]
    print(
        f"sample photos, precise BN: mean {sum(photo) / len(photo):.2%}, min {min(photo):.2%} over {len(photo)} seeds"
    )
    (OUT / "recipe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
