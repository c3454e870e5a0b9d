"""The activation codec alone (issue 21): pack + unpack time and temporaries, three ways, on the
activation shapes of resnet18 b32 at 224 px.

    .venv/bin/python bench/codec.py [--repeat 7] [--steps]

- eager, whole tensor: the eager codec in one chunk (what it did before it worked in chunks:
  a dozen full-size float temporaries);
- eager, chunked: `CHUNK_GROUPS` groups at a time (the fallback, and what fake tensors predict);
- fused: the compiled kernels (`edgetrain/methods/fused.py`), compile time reported apart.

Time: medians of interleaved runs of quantize + dequantize. Peak: bytes of live tensors above the
input while packing and unpacking (the packed bytes and the decoded tensor included: 1.0x the
input is the floor), from the profiler's allocation events (they see compiled code).
`--steps`: whole training steps of resnet18 b32 at 224 px, plain and 4 and 2 bits each way.
Writes bench/codec.txt's rows to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from frontier import profiled_peak

from edgetrain.methods import fused, packing

MiB = 2**20
SHAPES = [(32, 64, 112, 112), (32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)]
WAYS = ("eager, whole tensor", "eager, chunked", "fused")


def _set(way: str) -> None:
    fused.set_fused(way == "fused")
    packing.CHUNK_GROUPS = 1 << 40 if way == "eager, whole tensor" else CHUNK


def round_trip(x: torch.Tensor, bits: int, zero_exact: bool) -> torch.Tensor:
    return packing.dequantize(packing.quantize(x, bits, 256, True, zero_exact))


def step_table(repeat: int) -> None:
    """Whole training steps, resnet18 b32 224 px, 4 and 2 bits: the three ways side by side."""
    from edgetrain.core.step import make_optimizer, train_step
    from edgetrain.methods.base import prepare
    from edgetrain.models import create_model

    model = create_model("resnet18")
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 10, (32,))
    runs = []
    for methods in ([], ["compress:bits=4"], ["compress:bits=2"]):
        for way in WAYS if methods else ("eager, chunked",):
            m, _, settings = prepare(model, methods)
            opt = make_optimizer("sgd", m.parameters())
            _set(way)
            train_step(m, x, y, opt, settings)  # warm-up (and the compiles)
            runs.append(("+".join(methods) or "plain", way if methods else "-", m, settings, opt))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, (_, way, m, settings, opt) in enumerate(runs):
            _set(way if way != "-" else "eager, chunked")
            t0 = time.perf_counter()
            train_step(m, x, y, opt, settings)
            times[i].append(time.perf_counter() - t0)
    plain = statistics.median(times[0])
    print("\nwhole steps, resnet18 b32 224 px (SGD), interleaved, medians:")
    for (label, way, *_), t in zip(runs, times, strict=True):
        print(f"  {label:<18} {way:<20} {statistics.median(t):>6.2f} s  x{statistics.median(t) / plain:.2f} plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--steps", action="store_true", help="whole resnet18 steps instead of the codec alone")
    args = ap.parse_args()
    if args.steps:
        return step_table(min(args.repeat, 3))
    print(f"{'shape':<20} {'codec':<14} {'way':<20} {'ms':>8} {'x eager':>8} {'temp MiB':>9} {'x tensor':>9}")
    totals: dict[tuple, float] = {}
    for shape in SHAPES:
        x = torch.relu(torch.randn(*shape))
        for bits, ze in ((4, False), (2, False), (2, True)):
            codec = f"{bits}-bit{' +mask' if ze else ''}"
            for way in WAYS:  # warm-up (and the compiles)
                _set(way)
                round_trip(x, bits, ze)
            times: dict[str, list[float]] = {w: [] for w in WAYS}
            for _ in range(args.repeat):
                for way in WAYS:
                    _set(way)
                    t0 = time.perf_counter()
                    round_trip(x, bits, ze)
                    times[way].append(time.perf_counter() - t0)
            base = statistics.median(times[WAYS[0]])
            for way in WAYS:
                _set(way)
                peak = profiled_peak(lambda: round_trip(x, bits, ze), [])  # noqa: B023
                sec = statistics.median(times[way])
                totals[(codec, way)] = totals.get((codec, way), 0.0) + sec
                print(f"{str(tuple(shape)):<20} {codec:<14} {way:<20} {sec * 1e3:>8.1f} {sec / base:>8.2f} "
                      f"{peak / MiB:>9.1f} {peak / (x.numel() * 4):>9.2f}")  # fmt: skip
    print("\nall five shapes (one resnet18 stage each), ms:")
    for (codec, way), sec in totals.items():
        print(f"  {codec:<14} {way:<20} {sec * 1e3:>8.1f}  x{sec / totals[(codec, WAYS[0])]:.2f}")
    print("compile seconds (once per codec kernel):", fused.compile_seconds)


CHUNK = packing.CHUNK_GROUPS

if __name__ == "__main__":
    main()
