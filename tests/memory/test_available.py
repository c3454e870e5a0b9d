"""The available-memory sources: each reads what its platform trusts, and a bad one is one line."""

from __future__ import annotations

import pytest

from edgetrain.errors import ConfigError
from edgetrain.memory.available import (
    SourceUnreadable,
    cgroup_available,
    file_available,
    meminfo_available,
    named_source,
    open_source,
)

MiB = 2**20


def test_meminfo_reads_mem_available_not_mem_free(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       4044348 kB\nMemFree:          10240 kB\nMemAvailable:    524288 kB\n")
    assert meminfo_available(f) == 512 * MiB
    f.write_text("MemTotal:       4044348 kB\n")
    with pytest.raises(SourceUnreadable, match="no MemAvailable"):
        meminfo_available(f)


def test_this_hosts_meminfo_is_read():
    assert 0 < named_source("meminfo").read() < 2**50


def test_cgroup_is_limit_less_usage_and_unbounded_is_unreadable(tmp_path):
    (tmp_path / "memory.max").write_text(f"{1024 * MiB}\n")
    (tmp_path / "memory.current").write_text(f"{900 * MiB}\n")
    assert cgroup_available(tmp_path) == 124 * MiB
    (tmp_path / "memory.max").write_text("max\n")
    with pytest.raises(SourceUnreadable, match="no memory limit"):
        cgroup_available(tmp_path)


def test_a_file_holds_a_size_or_meminfo_lines(tmp_path):
    f = tmp_path / "avail"
    for text, want in (("800MiB", 800 * MiB), ("1048576", MiB), ("MemAvailable: 1024 kB\n", MiB)):
        f.write_text(text)
        assert file_available(f) == want
    f.write_text("plenty")
    with pytest.raises(SourceUnreadable, match="not a size"):
        file_available(f)
    with pytest.raises(SourceUnreadable, match="cannot be read"):
        file_available(tmp_path / "missing")


def test_a_named_source_that_cannot_be_read_is_one_line_naming_it_and_the_default(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_source(f"file:{tmp_path}/missing", "cpu", False, print)
    line = str(e.value)
    assert "--memory-source file:" in line and "cannot be read" in line and "auto (watches meminfo here)" in line
    assert "\n" not in line
    with pytest.raises(ConfigError, match="not a source: use one of auto, meminfo"):
        open_source("swap", "cpu", False, print)
    assert open_source("off", "cpu", False, print) is None


def test_auto_passes_over_sources_that_fail_with_a_line_each(monkeypatch):
    """A discrete GPU without NVML or CUDA here: both are passed over, and MemAvailable is watched."""
    lines: list[str] = []
    source = open_source("auto", "cuda", True, lines.append)
    assert source is not None and source.name == "meminfo"
    assert len(lines) == 2 and "NVML" in lines[0] and "watching cuda instead" in lines[0]
    assert "watching meminfo instead" in lines[1]
    # on a CPU host or a Jetson (shared memory) MemAvailable is the first choice: no line
    lines.clear()
    assert open_source("auto", "jetson", True, lines.append).name == "meminfo" and lines == []
