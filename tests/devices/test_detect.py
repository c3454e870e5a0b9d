from __future__ import annotations

from types import SimpleNamespace

from edgetrain.devices.detect import detect

GiB = 2**30


def _vm(total=4 * GiB, available=3 * GiB):
    return lambda: SimpleNamespace(total=total, available=available)


class FakeCuda:
    def __init__(self, total=8 * GiB, free=7 * GiB):
        self.total, self.free = total, free

    def is_available(self):
        return True

    def get_device_properties(self, i):
        return SimpleNamespace(
            name="NVIDIA GeForce GTX 750", total_memory=self.total, major=5, minor=0, is_integrated=False
        )

    def mem_get_info(self, i):
        return (self.free, self.total)


class FakeNvml:
    def __init__(self, fail=False):
        self.fail = fail

    def nvmlInit(self):
        if self.fail:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h0"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=GiB, free=900 * 2**20)

    def nvmlSystemGetDriverVersion(self):
        return "535.1"


def test_jetson_from_tegra_files(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref\n")
    d = detect(root=tmp_path, cuda=FakeCuda(), nvml=FakeNvml(), vm=_vm())
    assert d.kind == "jetson" and d.unified and d.compute_capability == "5.3"
    assert d.total_bytes == 4 * GiB and d.available_bytes == 3 * GiB  # from psutil, not NVML
    assert d.software["l4t"] == "R32.7.4"


def test_jetson_from_release_file_only(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    assert detect(root=tmp_path, cuda=FakeCuda(), vm=_vm()).kind == "jetson"


def test_cuda_uses_nvml_memory(tmp_path):
    d = detect(root=tmp_path, cuda=FakeCuda(), nvml=FakeNvml(), vm=_vm())
    assert d.kind == "cuda" and d.compute_capability == "5.0" and not d.unified
    assert d.total_bytes == GiB and d.available_bytes == 900 * 2**20 and d.software["driver"] == "535.1"


def test_cuda_falls_back_when_nvml_is_not_supported(tmp_path):
    d = detect(root=tmp_path, cuda=FakeCuda(total=8 * GiB, free=5 * GiB), nvml=FakeNvml(fail=True), vm=_vm())
    assert d.kind == "cuda" and d.total_bytes == 8 * GiB and d.available_bytes == 5 * GiB


def test_cpu_when_no_gpu(tmp_path):
    no_cuda = SimpleNamespace(is_available=lambda: False)
    d = detect(root=tmp_path, cuda=no_cuda, vm=_vm(16 * GiB, 10 * GiB))
    assert d.kind == "cpu" and d.total_bytes == 16 * GiB and d.available_bytes == 10 * GiB
