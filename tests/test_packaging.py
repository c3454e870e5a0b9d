"""The built-in profiles must be found after a plain (non-editable) install, away from the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profiles_found_after_non_editable_install(tmp_path):
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(ROOT),
    ]
    r = subprocess.run(pip, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    code = "import edgetrain.devices.store as s; print(s.builtin_dir()); print(','.join(s.list_devices()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(target), "HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    where, names = r.stdout.split()
    assert str(target) in where and str(ROOT) not in where
    assert names.split(",") == ["cpu", "gtx750-1gb", "jetson-nano", "jetson-orin-nano", "jetson-xavier-nx"]
