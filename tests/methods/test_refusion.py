"""Re-fused CP (methods/refusion.py) against the unfused chain in float64: every conv geometry,
every subset of trained factors, and the graphs around the Function (input reused, output mixed
with older tensors, two calls before one backward, dropout upstream)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.memory.measure import tracked_step
from edgetrain.methods import lowrank_layers as ll

GEOMETRIES = {
    "3x3": dict(kernel_size=3, padding=1),
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "groups4": dict(kernel_size=3, padding=1, groups=4),
    "rect-5x3-stride(2,1)": dict(kernel_size=(5, 3), padding=(2, 1), stride=(2, 1)),
    "no-padding": dict(kernel_size=3),
}
PARTS = ("first", "vertical", "horizontal", "last")


def _pair(geometry: dict, recompute: str, bias: bool = True) -> tuple[nn.Module, nn.Module]:
    """(unfused, re-fused) CP layers with the same random float64 factors."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, bias=bias, **geometry)
    unfused = ll.CPConv2d(conv, rank=12).double()
    for p in unfused.parameters():
        nn.init.normal_(p, std=0.3)
    refused = copy.deepcopy(unfused)
    refused.refuse, refused.recompute = True, recompute
    return unfused, refused


def _grads(layer: nn.Module, graph, x: torch.Tensor) -> list:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the same dropout masks for both layers
    graph(layer, x).square().sum().backward()
    return [x.grad] + [p.grad for p in layer.parameters()]


def _assert_close(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("recompute", ["depthwise", "all"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_every_geometry_and_every_subset_of_trained_factors_gives_the_unfused_gradients(geometry, recompute):
    x = torch.randn(3, 8, 11, 9, dtype=torch.float64)
    for trained in itertools.chain.from_iterable(itertools.combinations(PARTS, k) for k in (1, 2, 4)):
        unfused, refused = _pair(GEOMETRIES[geometry], recompute)
        for layer in (unfused, refused):
            for name in PARTS:
                getattr(layer, name).requires_grad_(name in trained)
        _assert_close(_grads(refused, lambda m, x: m(x), x), _grads(unfused, lambda m, x: m(x), x))


GRAPHS = {
    "input reused": lambda m, x: m(x) + x * 2,
    "output mixed with an older tensor": lambda m, x: m(x) * torch.tanh(x) + m(x).mean(),
    "two calls before one backward": lambda m, x: m(m(x).relu()) + m(x.flip(3)),
    "dropout upstream": lambda m, x: m(nn.functional.dropout(x, 0.3, training=True)),
    "input without grad": lambda m, x: m(x.detach()),
}


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_graph_around_the_function_gives_the_unfused_gradients(graph):
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    unfused, refused = _pair(GEOMETRIES["3x3"], "depthwise")
    _assert_close(_grads(refused, GRAPHS[graph], x), _grads(unfused, GRAPHS[graph], x))


def test_no_bias_and_no_trained_weights_at_all():
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    unfused, refused = _pair(GEOMETRIES["stride2"], "all", bias=False)
    _assert_close(_grads(refused, lambda m, x: m(x), x), _grads(unfused, lambda m, x: m(x), x))
    for layer in (unfused, refused):
        layer.requires_grad_(False)
    _assert_close(_grads(refused, lambda m, x: m(x), x), _grads(unfused, lambda m, x: m(x), x))


@pytest.mark.parametrize("recompute", ["depthwise", "all"])
def test_it_keeps_less_than_unfused_and_the_fake_step_predicts_the_real_one(recompute):
    unfused, refused = (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), m, nn.Flatten(), nn.LazyLinear(10)).float()
                        for m in _pair(GEOMETRIES["3x3"], recompute))  # fmt: skip
    spec = StepSpec((3, 16, 16), 4, 10)
    for net in (unfused, refused):
        net(torch.randn(1, 3, 16, 16))
    saved = [tracked_step(m, spec, fake=False).saved_activation_bytes for m in (unfused, refused)]
    chain = 4 * 4 * 16 * 16 * 12  # one (N, R, H, W) float32 intermediate
    assert saved[0] - saved[1] >= (2 if recompute == "depthwise" else 3) * chain
    assert tracked_step(refused, spec, fake=True).peak_bytes == tracked_step(refused, spec, fake=False).peak_bytes
