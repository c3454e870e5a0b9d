"""Shared fixtures: an isolated user profile directory and cache, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("EDGETRAIN_FUSED", "off")  # compiles cost seconds a codec: tests/methods/test_fused.py has them
from edgetrain.cli.main import main  # noqa: E402

_REAL_CACHE = Path.home() / ".cache" / "edgetrain"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own XDG config dir; the overhead cache is shared (it is slow to measure)."""
    cfg = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    monkeypatch.setenv("XDG_CACHE_HOME", str(_REAL_CACHE.parent))
    from edgetrain.devices import store

    monkeypatch.setattr(store, "_extra_dirs", [])
    yield cfg


@pytest.fixture
def cli(capsys):
    """Run `edgetrain ARGS` in-process: returns (exit code, stdout, stderr)."""

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def cli_json(cli):
    def run(*args: str):
        code, out, err = cli(*args, "--json")
        assert code == 0, err
        return json.loads(out)

    return run


def copy_profile(name: str, dest: Path) -> Path:
    from edgetrain.devices.store import builtin_dir

    return Path(shutil.copy(builtin_dir() / f"{name}.yaml", dest / f"{name}.yaml"))
