"""Fused codec kernels: the same bytes and codes as the eager codec from the same random bytes,
the eager codec under fake tensors and the tracker, and one warning line when a compile fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from edgetrain.memory.tracker import MemoryTracker
from edgetrain.methods import fused, packing


@pytest.fixture
def fused_on():
    fused.set_fused(True)
    yield
    fused.set_fused(False)


def _both(x: torch.Tensor, bits: int, zero_exact: bool, stochastic: bool = True):
    """(fused pack, eager pack, fused decode of the eager pack, eager decode), one seed for both packs."""
    torch.manual_seed(7)
    fused.set_fused(True)
    pf = packing.quantize(x, bits, 256, stochastic, zero_exact)
    torch.manual_seed(7)
    fused.set_fused(False)
    pe = packing.quantize(x, bits, 256, stochastic, zero_exact)
    de = packing.dequantize(pe)
    fused.set_fused(True)
    return pf, pe, packing.dequantize(pe), de


@pytest.mark.parametrize("bits,zero_exact", [(2, True), (4, False)])
def test_fused_codes_and_decodes_equal_the_eager_codec(fused_on, bits, zero_exact):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(3, 40, 15, 17))  # 30600 elements: the last group is padded
    pf, pe, df, de = _both(x, bits, zero_exact)
    assert [t.shape for t in pf.tensors] == [t.shape for t in pe.tensors] and pf.nbytes() == pe.nbytes()
    codes_f, codes_e = pf.tensors[0], pe.tensors[0]
    assert torch.equal(pf.tensors[1], pe.tensors[1])  # min and scale: computed once, eagerly
    assert (codes_f == codes_e).float().mean() > 0.999  # float contraction may move a boundary code
    if zero_exact:
        assert torch.equal(pf.tensors[2], pe.tensors[2]) and torch.equal(df > 0, x > 0)
    assert torch.equal(df, de)  # decoding is exact arithmetic on the codes
    assert fused.compile_seconds, "the first call of a kernel reports its compile time"


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_exact", [True, False])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_eager_for_every_codec(fused_on, bits, zero_exact, stochastic, dtype):
    torch.manual_seed(bits)
    x = (torch.relu(torch.randn(4, 24, 19, 19)) * 3).to(dtype)
    pf, pe, df, de = _both(x, bits, zero_exact, stochastic)
    assert pf.nbytes() == pe.nbytes() and torch.equal(pf.tensors[1], pe.tensors[1])
    assert (pf.tensors[0] == pe.tensors[0]).float().mean() > 0.999
    assert df.dtype == dtype and torch.equal(df, de)
    step = (pe.tensors[1][1].float().max() * 1.01).item()
    assert ((packing.dequantize(pf).float() - de.float()).abs() <= step + 1e-6).all()  # at most one code step


def test_a_failed_compile_warns_once_and_the_eager_codec_answers(fused_on, monkeypatch):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("C++ compile failed: no compiler\nmore lines")

        return call

    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_BROKEN", set())
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(8, 1000)
    torch.manual_seed(1)
    with pytest.warns(
        RuntimeWarning,
        match=r"fused codec kernel .* failed \(C\+\+ compile failed: no compiler\); using the eager codec",
    ):
        got = packing.dequantize(packing.quantize(x, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is quiet
        packing.dequantize(packing.quantize(x, 4))
    fused.set_fused(False)
    torch.manual_seed(1)
    assert torch.equal(got, packing.dequantize(packing.quantize(x, 4)))


def test_fake_tensors_and_the_tracker_get_the_eager_codec_with_the_same_bytes(fused_on):
    x = torch.randn(2, 64, 32, 32)
    real = packing.quantize(x, 2)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert not fused.usable(fx)
        fake = packing.quantize(fx, 2)
    assert [t.shape for t in fake.tensors] == [t.shape for t in real.tensors]
    with MemoryTracker():
        assert not fused.usable(x)  # the tracker sees every allocation of the eager chunks
    assert fused.usable(x)


def test_the_eager_chunks_hold_small_temporaries():
    """The eager codec works chunk by chunk: its peak is the packed output, the random bytes and
    one chunk's temporaries, not a dozen full-size float tensors."""
    fused.set_fused(False)
    x = torch.randn(64, 64, 32, 32)  # 16 MiB, 16 chunks
    with MemoryTracker() as tr:
        packing.dequantize(packing.quantize(x, 4))
    rep = tr.report()
    out = x.numel() * 4  # the decoded tensor
    chunk = packing.CHUNK_GROUPS * 256 * 4
    assert rep.peak_bytes - x.numel() * 4 <= out + x.numel() // 2 + 6 * chunk


def test_a_compressed_step_with_fused_kernels_gives_the_eager_step_s_gradients(fused_on):
    from torch import nn

    from edgetrain.methods.base import prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10))  # fmt: skip
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    grads = []
    for on in (True, False):
        fused.set_fused(on)
        m, _, _ = prepare(model, ["compress:bits=4"])
        torch.manual_seed(3)
        nn.functional.cross_entropy(m(x), y).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    for gf, ge in zip(*grads, strict=True):
        assert torch.allclose(gf, ge, rtol=1e-3, atol=1e-5)
