"""Codecs: round-trip error bounds, exactness, unbiased rounding, and bytes equal to theory."""

from __future__ import annotations

import pytest
import torch

from edgetrain.methods import packing


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packing_round_trips(bits):
    q = torch.randint(0, 2**bits, (8 * 37,), dtype=torch.uint8)
    p = packing.pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.numel() == q.numel() * bits // 8
    assert torch.equal(packing.unpack_bits(p, bits), q)


def test_mask_is_exact_at_one_bit_an_element():
    m = torch.rand(3, 5, 7) > 0.5
    p = packing.pack_mask(m)
    assert p.numel() == -(-m.numel() // 8)
    assert torch.equal(packing.unpack_mask(p, m.shape), m)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_error_within_one_step(bits, stochastic):
    torch.manual_seed(bits)
    x = torch.randn(4, 8, 16, 16) * 3 + 1
    p = packing.quantize(x, bits, group=128, stochastic=stochastic)
    err = (packing.dequantize(p) - x).view(-1, 128).abs()  # (G, group)
    step = (x.view(-1, 128).amax(1) - x.view(-1, 128).amin(1)) / (2**bits - 1)  # (G,)
    bound = step * 1.02 * (1.0 if stochastic else 0.5)  # bf16 meta is rounded outwards: < 1% wider
    assert (err <= bound[:, None] + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bytes_stored_are_the_bit_width_plus_group_metadata(bits):
    x = torch.randn(2, 16, 9, 9)  # 2592 elements: not a multiple of the group, so one padded group
    p = packing.quantize(x, bits, group=256)
    groups = -(-x.numel() // 256)
    assert p.nbytes() == groups * 256 * bits // 8 + groups * 2 * 2  # codes + (min, scale) in bf16


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(2048)
    draws = torch.stack([packing.dequantize(packing.quantize(x, 2, 256)) for _ in range(400)])  # (400, 2048)
    bias = draws.mean(0) - x
    step = (x.view(-1, 256).amax(1) - x.view(-1, 256).amin(1)).max() / 3
    assert bias.mean().abs() < 0.01 * step  # over all elements: no systematic shift
    assert bias.abs().max() < 5 * (step / 2) / 400**0.5  # each element within 5 sigma of the mean
    nearest = packing.dequantize(packing.quantize(x, 2, 256, stochastic=False)) - x
    assert nearest.abs().mean() > 10 * bias.abs().mean()  # deterministic rounding is biased per element


def test_zero_exact_keeps_the_relu_mask():
    torch.manual_seed(0)
    r = torch.relu(torch.randn(8, 16, 8, 8)) * 0.01 + torch.relu(torch.randn(8, 16, 8, 8)) * (torch.rand(1) > 2)
    for _ in range(5):
        out = packing.dequantize(packing.quantize(r, 2, 256, zero_exact=True))
        assert torch.equal(out > 0, r > 0)
    plain = packing.dequantize(packing.quantize(r, 2, 256))
    assert not torch.equal(plain > 0, r > 0)  # without it small positives round to zero


def test_similar_scheme_bounds_and_zeros():
    torch.manual_seed(0)
    smooth = torch.linspace(0, 1, 32).repeat(4, 8, 32, 1) + 0.01 * torch.randn(4, 8, 32, 32)  # (N, C, H, W)
    x = torch.relu(smooth - 0.3)
    p = packing.similar(x, bits=2, group=256, block=4, zero_exact=True)
    y = packing.unsimilar(p)
    assert torch.equal(y == 0, x == 0) and torch.equal(y > 0, x > 0)  # exact zeros, exact ReLU mask
    blocks = x.view(-1, 4)
    spread = (blocks - blocks.mean(1, keepdim=True)).abs().view(-1, 256).amax(1)  # delta range per group
    assert (y - x).abs().max() < 2.5 * spread.max()  # errors scale with neighbour differences
    q2 = packing.dequantize(packing.quantize(x, 2, 256))
    assert (y - x).abs().mean() < 0.3 * (q2 - x).abs().mean()  # same delta bits: far finer than 2-bit
    assert p.nbytes() / (x.numel() * 4) < 0.18  # 2 + 2 + 1 bits an element and metadata


def test_masks_pack_and_unpack_without_full_size_float_copies():
    """A ReLU's mask is packed a chunk at a time: its temporaries are a chunk's, not two fp32
    copies of the whole mask (which were the 2-bit step's forward peak)."""
    from edgetrain.memory.tracker import MemoryTracker

    m = torch.rand(16, 64, 128, 128) > 0.5  # 16M elements (a whole fp32 copy: 64 MiB), 64 chunks
    chunk = packing.CHUNK_GROUPS * 256 * 4  # one chunk in fp32: 1 MiB
    with MemoryTracker() as tr:
        tr.track([m], "inputs")  # the tracker sees the mask's storage through the codec's views
        p = packing.pack_mask(m)
    assert tr.report().peak_bytes - m.numel() <= m.numel() // 8 + 8 * chunk
    with MemoryTracker() as tr:
        back = packing.unpack_mask(p, m.shape)
    assert tr.report().peak_bytes <= m.numel() + 8 * chunk  # the bool output and a chunk's work
    assert torch.equal(back, m)
