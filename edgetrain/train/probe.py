"""Measure one real training step in a fresh process: `python -m edgetrain.train.probe JSON`.

A fresh process is the only honest way to read a step's peak resident memory: the peak RSS of
a process that did other work first says nothing about the step. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from edgetrain.memory.process import peak_rss_bytes, reset_peak_rss


def _main(req: dict[str, Any]) -> dict[str, Any]:
    from edgetrain.memory.allocator import pin_malloc_policy

    pin_malloc_policy()
    import psutil
    import torch
    import torchvision  # noqa: F401 - the framework a training process carries

    framework = psutil.Process().memory_info().rss
    from edgetrain.core.step import StepSpec
    from edgetrain.memory.measure import tracked_step as step
    from edgetrain.methods.base import as_config, prepare
    from edgetrain.models import create_model

    torch.manual_seed(0)
    cuda = req.get("cuda", False) and torch.cuda.is_available()
    model = create_model(req["model"], req["num_classes"])
    if req.get("plan"):
        from edgetrain.planning.record import Plan, apply_plan_

        settings = apply_plan_(model, Plan.from_dict(req["plan"]))
    else:
        fresh = [as_config(m).from_scratch() for m in req.get("methods", [])]  # a fresh model: fresh factors,
        model, _, settings = prepare(model, fresh)  # filled, so the real step reads and writes what a run does
    spec = StepSpec(tuple(req["input_shape"]), req["batch_size"], req["num_classes"], req["optimizer"], settings)
    if cuda:
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
    setup = peak_rss_bytes()  # building the model and applying methods (low-rank: dense and factors at once)
    reset_peak_rss()  # what follows is the step's own peak
    report = step(model, spec, fake=False, inplace=True, budget_bytes=req.get("budget"))
    out = {
        "peak_total_bytes": report.peak_bytes,
        "within_op_peak_bytes": report.within_op_peak_bytes,  # with oneDNN's inner copies (memory/tracker.py)
        "saved_activation_bytes": report.saved_activation_bytes,
        "framework_bytes": framework,
        "peak_rss_bytes": peak_rss_bytes(),
        "setup_peak_rss_bytes": setup,
    }
    if cuda:
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


TIMEOUT_ENV = "EDGETRAIN_PROBE_TIMEOUT"  # seconds a measuring process may run (default 900)


def measure_in_subprocess(request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `_main(request)` in a fresh interpreter; errors, a time-out too, come back as one line."""
    from edgetrain.errors import ConfigError, EdgeOOMError, EdgetrainError

    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, 900)) if timeout is None else timeout
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgetrain.train.probe", json.dumps(request)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        what = f"{request.get('model', 'a model')} at batch {request.get('batch_size', '?')}"
        raise EdgetrainError(
            f"the measuring process ({what}) did not finish within {timeout:g} s and was stopped: "
            f"measure a smaller step, or raise the limit with {TIMEOUT_ENV}=SECONDS"
        ) from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "EdgeOOMError" in last:
            raise EdgeOOMError(last.split(": ", 1)[-1])
        raise EdgetrainError(f"measuring process failed: {last}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(_main(json.loads(sys.argv[1]))))
