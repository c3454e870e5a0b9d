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


def layer_times(models: list, kind: type, input_shape: tuple, batch: int, repeat: int) -> list[float]:
    """Median time of forward + backward (input and weight gradients) of the `kind` layers alone,
    summed over each model's layers, the models taking turns; each layer gets a fresh random input
    of the shape it sees in a real forward."""
    runs = []
    for model in models:
        shapes: dict = {}
        layers = [m for m in model.modules() if isinstance(m, kind)]
        hooks = [
            m.register_forward_hook(lambda m, i, o, shapes=shapes: shapes.__setitem__(m, i[0].shape)) for m in layers
        ]
        with torch.no_grad():
            model(torch.randn(batch, *input_shape))
        for h in hooks:
            h.remove()
        runs.append([(m, shapes[m]) for m in layers])
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeat + 1):  # the first round warms up
        for i, layers in enumerate(runs):
            total = 0.0
            for m, shape in layers:
                x = torch.randn(shape, requires_grad=True)
                t0 = time.perf_counter()
                m(x).sum().backward()
                total += time.perf_counter() - t0
            if r:
                times[i].append(total)
    return [statistics.median(t) for t in times]
