"""Step timing shared by the benchmarks: medians of interleaved steps, so that the machine's drift
hits every method alike."""

from __future__ import annotations

import statistics
import time

import torch

from edgetrain.core.step import make_optimizer, train_step


def interleaved_times(steps: list, repeat: int, optimizer: str = "sgd") -> list[float]:
    """Median step time of each (model, spec), the models taking turns step by step."""
    runs = []
    for model, spec in steps:
        opt = make_optimizer(optimizer, model.parameters())
        x, y = torch.randn(spec.batch_size, *spec.input_shape), torch.randint(0, 10, (spec.batch_size,))
        train_step(model, x, y, opt, spec.settings)  # warm-up
        runs.append((model, spec, opt, x, y))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, (model, spec, opt, x, y) in enumerate(runs):
            t0 = time.perf_counter()
            train_step(model, x, y, opt, spec.settings)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
