"""Predicted vs measured: the check behind the memory model's accuracy figures (bench and tests)."""

from __future__ import annotations

from typing import Any

from edgetrain.memory.predict import Prediction
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.calibrate import resolve_profile
from edgetrain.train.probe import measure_in_subprocess


def compare_case(
    model: str,
    batch_size: int,
    size: int,
    methods: list[str] = (),  # type: ignore[assignment]
    device: str = "cpu",
    optimizer: str = "sgd",
    num_classes: int = 10,
) -> dict[str, Any]:
    """Predict one step (fake tensors) for `device`, measure it (fresh process on this machine),
    return both and the errors. Tensor level: predicted vs tracked peak of live tensor bytes.
    Process level: predicted vs the measuring process's peak RSS (a CPU host; on a CUDA device the
    allocator's reserved peak instead), so `device` must be this machine's profile."""
    profile = resolve_profile(device)
    shape = (3, size, size)
    est = estimate(
        create_model(model, num_classes), shape, batch_size, optimizer, profile, list(methods), num_classes, model
    )
    req = {"model": model, "num_classes": num_classes, "input_shape": list(shape), "batch_size": batch_size,
           "optimizer": optimizer, "methods": list(methods), "cuda": profile.kind == "cuda"}  # fmt: skip
    c = host_check(req, est.predicted)
    return {
        "model": model,
        "batch": batch_size,
        "size": size,
        "methods": "+".join(methods) or "plain",
        "pred_tensor": c["host_predicted_tensor_bytes"],
        "meas_tensor": c["host_measured_tensor_bytes"],
        "tensor_err": c["host_tensor_error"],
        "pred_saved": est.predicted.saved_activation_bytes,
        "meas_saved": c["host_measured_saved_activation_bytes"],
        "pred_process": c["host_predicted_process_bytes"],
        "meas_process": c["host_measured_process_bytes"],
        "process_err": c["host_process_error"],
    }


def host_check(req: dict[str, Any], host: Prediction) -> dict[str, Any]:
    """Run the step `req` describes (train/probe.py) in a fresh process on this machine, and set it
    beside `host`, the prediction for this machine: every figure is this host's, and each field
    says so, so that none is read against another device's prediction."""
    meas = measure_in_subprocess(req)
    on_gpu = "cuda_max_reserved_bytes" in meas
    measured = meas["cuda_max_reserved_bytes"] if on_gpu else meas["peak_rss_bytes"]
    predicted = host.peak_device_bytes if on_gpu else host.peak_process_bytes
    return {
        "machine": "this host's GPU: the caching allocator's reserved peak" if on_gpu else "this host: peak RSS",
        "host_predicted_tensor_bytes": host.peak_total_bytes,
        "host_measured_tensor_bytes": meas["peak_total_bytes"],
        "host_tensor_error": host.peak_total_bytes / meas["peak_total_bytes"] - 1,
        "host_measured_saved_activation_bytes": meas["saved_activation_bytes"],
        "host_predicted_process_bytes": predicted,
        "host_measured_process_bytes": measured,
        "host_process_error": predicted / measured - 1,
        # building the model and applying methods, before the step (its own peak; not predicted)
        "host_measured_setup_process_bytes": meas.get("setup_peak_rss_bytes"),
    }
