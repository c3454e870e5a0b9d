"""Predicted vs measured: the check behind the memory model's accuracy figures (bench and tests)."""

from __future__ import annotations

from typing import Any

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
    """Predict one step (fake tensors), measure it (fresh process), return both and the errors.

    Tensor level: predicted vs tracked peak of live tensor bytes. Process level: predicted vs
    the measuring process's peak RSS (a CPU host; on a CUDA device the probe reports the
    allocator's reserved peak instead).
    """
    profile = resolve_profile(device)
    shape = (3, size, size)
    est = estimate(
        create_model(model, num_classes), shape, batch_size, optimizer, profile, list(methods), num_classes, model
    )
    req = {"model": model, "num_classes": num_classes, "input_shape": list(shape), "batch_size": batch_size,
           "optimizer": optimizer, "methods": list(methods), "cuda": profile.kind == "cuda"}  # fmt: skip
    meas = measure_in_subprocess(req)
    p = est.predicted
    measured_process = meas.get("cuda_max_reserved_bytes", meas["peak_rss_bytes"])
    predicted_process = p.peak_process_bytes if "cuda_max_reserved_bytes" not in meas else p.peak_device_bytes
    return {
        "model": model,
        "batch": batch_size,
        "size": size,
        "methods": "+".join(methods) or "plain",
        "pred_tensor": p.peak_total_bytes,
        "meas_tensor": meas["peak_total_bytes"],
        "tensor_err": p.peak_total_bytes / meas["peak_total_bytes"] - 1,
        "pred_saved": p.saved_activation_bytes,
        "meas_saved": meas["saved_activation_bytes"],
        "pred_process": predicted_process,
        "meas_process": measured_process,
        "process_err": predicted_process / measured_process - 1,
    }
