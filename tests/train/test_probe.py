"""The fresh-process probe: bounded in time, and every failure is one line."""

from __future__ import annotations

import pytest


def test_a_measuring_process_that_times_out_gets_one_line(monkeypatch):
    from edgetrain.errors import EdgetrainError
    from edgetrain.train.probe import TIMEOUT_ENV, measure_in_subprocess

    monkeypatch.setenv(TIMEOUT_ENV, "0.01")
    req = {"model": "cifar_resnet8", "num_classes": 10, "input_shape": [3, 16, 16], "batch_size": 4, "optimizer": "sgd"}
    with pytest.raises(EdgetrainError, match=rf"did not finish within 0.01 s .* {TIMEOUT_ENV}=SECONDS") as e:
        measure_in_subprocess(req)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(EdgetrainError, match="not a number of seconds"):
        measure_in_subprocess(req)
