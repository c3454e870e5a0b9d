"""Reversible chains inside any graph: gradients equal the stored-activation chain's in float64.

Each case builds the same chain twice (reversible, and `enabled=False`: autograd stores
everything), runs the same graph pattern around it from the same RNG state, and compares every
gradient (stem, chain, and the input where it is a leaf) to 1e-9 relative. Random modules of every
kind sit inside F and G, so a mask that is not replayed shows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from edgetrain.errors import ConfigError
from edgetrain.methods.reversible import Coupling, InvDownsample, ReversibleSequence


class Noise(nn.Module):
    """A stochastic module of a user's own: additive Gaussian noise from torch's generator."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x


RANDOM = {
    "none": nn.Identity,
    "dropout": lambda: nn.Dropout(0.3),
    "dropout2d": lambda: nn.Dropout2d(0.3),
    "alpha_dropout": lambda: nn.AlphaDropout(0.3),
    "feature_alpha_dropout": lambda: nn.FeatureAlphaDropout(0.3),
    "stochastic_depth": lambda: StochasticDepth(0.3, "row"),
    "noise": Noise,
}


def _fn(c: int, random: str) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), RANDOM[random]())


def _chain(random: str) -> ReversibleSequence:
    blocks = [Coupling(_fn(2, random), _fn(2, random)), InvDownsample(), Coupling(_fn(8, random), _fn(8, random))]
    return ReversibleSequence(blocks).double()


def _loss(chain, stem, x, pattern: str):
    """A graph pattern around the chain; returns (scalar loss, output, gradient fed in or None)."""
    h = stem(x)  # (N, 4, 8, 8)
    if pattern == "plain":
        y = chain(h)
    elif pattern == "input_reused":  # a residual around the chain: one gradient tensor feeds both branches
        y = nn.functional.pixel_unshuffle(h, 2) + chain(h)
    elif pattern == "output_mixed":  # the output combined with a tensor made before it
        y = chain(h) * nn.functional.pixel_unshuffle(h, 2)
    elif pattern == "two_calls":  # two calls before one backward, different inputs
        y = chain(h) + chain(2 * h)
    elif pattern == "same_input_twice":
        y = chain(h) - 0.5 * chain(h)
    elif pattern == "nested":  # the output fed back through the same chain (after reshaping)
        y = chain(nn.functional.pixel_shuffle(chain(h), 2))
    elif pattern == "leaf_input":  # the chain's input is the leaf itself
        y = chain(x)
    else:
        raise AssertionError(pattern)
    return (y**2).sum() + y.mean(), y


PATTERNS = ["plain", "input_reused", "output_mixed", "two_calls", "same_input_twice", "nested", "leaf_input"]


def _grads(chain, stem, x, pattern: str) -> list[torch.Tensor]:
    torch.manual_seed(7)
    loss, _ = _loss(chain, stem, x, pattern)
    loss.backward()
    return [p.grad for p in [*stem.parameters(), *chain.parameters()]] + ([x.grad] if x.requires_grad else [])


def _pair(random: str, pattern: str):
    torch.manual_seed(1)
    chain = _chain(random)
    stem = nn.Conv2d(4 if pattern == "leaf_input" else 3, 4, 3, padding=1).double()
    ref = copy.deepcopy(chain)
    ref.enabled = False
    x = torch.randn(3, 4 if pattern == "leaf_input" else 3, 8, 8, dtype=torch.float64)
    if pattern == "leaf_input":
        x.requires_grad_(True)
    return (chain, stem, x), (ref, copy.deepcopy(stem), x.detach().clone().requires_grad_(x.requires_grad))


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-9) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if b is None:
            assert a is None or not a.any(), i
            continue
        assert a is not None, i
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, (i, err)


@pytest.mark.parametrize("random", list(RANDOM))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradients_equal_stored_chain_in_any_graph(pattern, random):
    (chain, stem, x), (ref, rstem, rx) = _pair(random, pattern)
    _assert_equal(_grads(chain, stem, x, pattern), _grads(ref, rstem, rx, pattern))
    for a, b in zip(chain.buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b)  # BatchNorm statistics updated once per call, as in the stored chain


def test_backward_leaves_the_callers_tensors_alone():
    """The output the caller holds and the gradient it passes in are not rebuilt in place."""
    torch.manual_seed(0)
    chain = _chain("dropout2d")
    h = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y = chain(h)
    g = torch.randn_like(y)
    y0, g0 = y.detach().clone(), g.clone()
    y.backward(g)
    assert torch.equal(y, y0) and torch.equal(g, g0)


def test_retained_graph_runs_backward_twice():
    (chain, stem, x), (ref, rstem, rx) = _pair("dropout", "input_reused")
    for c, s in ((chain, stem), (ref, rstem)):
        torch.manual_seed(7)
        loss, _ = _loss(c, s, x if c is chain else rx, "input_reused")
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_equal([p.grad for p in chain.parameters()], [p.grad for p in ref.parameters()])


def test_stored_and_checked_blocks_keep_gradients_exact():
    """The drift guard's paths (a block that stores its input, a step that checks) stay exact."""
    (chain, stem, x), (ref, rstem, rx) = _pair("dropout2d", "input_reused")
    chain.blocks[0].store_input = chain.blocks[2].store_input = True
    chain.check_every = 1
    _assert_equal(_grads(chain, stem, x, "input_reused"), _grads(ref, rstem, rx, "input_reused"))
    assert set(chain.last_errors) == {0, 1, 2}


def test_modifying_a_stored_input_in_place_is_refused():
    chain = _chain("none")
    chain.blocks[0].store_input = True
    h = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True) * 1.0
    y = chain(h)
    h.mul_(2)  # the chain would rebuild from a changed input: autograd's version check refuses it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_block_without_inverse_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"block 1 \(Conv2d\) has no inverse\(\)") as e:
        ReversibleSequence([InvDownsample(), nn.Conv2d(4, 4, 3)])
    assert "\n" not in str(e.value)


def test_torch_memtracker_measures_a_reversible_model():
    """Users can check edgetrain's figures with torch's own tracker: it runs through the chain, and
    its peak agrees with edgetrain's measurement of the same step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from edgetrain.core.step import StepSpec, make_optimizer
    from edgetrain.memory.measure import tracked_step
    from edgetrain.models import create_model

    torch.manual_seed(0)
    model = create_model("revnet")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = make_optimizer("sgd", model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()  # warm: momentum exists, as in edgetrain's step
    opt.step()
    opt.zero_grad(set_to_none=True)
    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    theirs = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    ours = tracked_step(create_model("revnet"), StepSpec((3, 32, 32), 16, 10), fake=False).peak_bytes
    assert abs(theirs - ours) / ours < 0.1, (theirs, ours)
