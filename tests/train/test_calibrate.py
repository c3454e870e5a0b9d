from __future__ import annotations

import json

from edgetrain.train import calibrate

MiB = 2**20


def test_overheads_keep_the_largest_reading_of_each_figure_and_are_cached(tmp_path, monkeypatch):
    """One low framework reading, cached, made every later prediction err low: the cache keeps
    the largest of the readings, figure by figure, and later calls measure nothing."""
    readings = iter([{"framework": 700 * MiB, "workspace": 52 * MiB}, {"framework": 712 * MiB, "workspace": 50 * MiB}])
    calls = []
    monkeypatch.setattr(calibrate, "measure_overheads", lambda: calls.append(1) or next(readings))
    cache = tmp_path / "overheads.json"
    monkeypatch.setattr(calibrate, "overheads_cache", lambda: cache)
    monkeypatch.setattr(calibrate, "cached_overheads", lambda: json.loads(cache.read_text()) if cache.exists() else {})
    want = {"framework": 712 * MiB, "workspace": 52 * MiB}
    assert calibrate.measured_overheads() == want
    assert len(calls) == calibrate.READINGS == 2
    assert json.loads(cache.read_text()) == want
    assert calibrate.measured_overheads() == want and len(calls) == 2  # read back, not measured again
