"""The optimizer step in backward: the same weights as the plain step (float64, `torch.equal`) in
every graph around it, gradients freed as they are used, and the cases it cannot do refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSettings, make_optimizer, train_step
from edgetrain.errors import ConfigError
from edgetrain.memory.tracker import MemoryTracker
from edgetrain.methods.base import prepare, step_settings_for
from edgetrain.models import create_model


class Shared(nn.Module):
    """A layer used twice, an input reused after it, a frozen layer and dropout: the graph patterns
    that break a per-parameter update (stepping a weight before all its uses are summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = nn.Conv2d(8, 8, 1).requires_grad_(False)
        self.drop = nn.Dropout(0.3)  # a stochastic module: both paths draw the same masks
        self.head = nn.Linear(8, 10)

    def forward(self, x):  # (N, 3, H, W)
        h = torch.relu(self.conv(x))
        h = torch.relu(self.mid(h)) + self.mid(h) + h  # the same weights twice, the input again
        h = self.drop(self.frozen(h))
        return self.head(h.mean((2, 3)))  # (N, 10)


def _weights_after(model: nn.Module, settings: StepSettings, optimizer: str, steps: int = 3) -> list[torch.Tensor]:
    opt = make_optimizer(optimizer, model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        torch.manual_seed(2)  # the same stochastic draws (dropout, stochastic rounding) on both paths
        x = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        train_step(model, x, y, opt, settings)
    return [t.detach().clone() for t in model.state_dict().values()]


CASES = [
    ("cifar_resnet8", []),
    ("cifar_resnet8", ["microbatch:micro_batches=4"]),
    ("cifar_resnet8", ["checkpoint"]),
    ("cifar_resnet8", ["compress:bits=2"]),
    ("cifar_resnet8", ["freeze:upto=stem"]),
    ("cifar_resnet8", ["tucker2:ratio=0.5"]),
    ("cifar_resnet8", ["cp:rank=4,iters=2", "partial"]),
    ("revnet", []),
    ("cifar_resnet20", ["reversible"]),
    ("shared", []),
]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name,methods", CASES, ids=[f"{n}-{'+'.join(m) or 'plain'}" for n, m in CASES])
def test_the_same_weights_as_the_plain_step(name, methods, optimizer):
    torch.manual_seed(0)
    model = Shared() if name == "shared" else create_model(name, num_classes=10)
    plain, _, settings = prepare(model, methods)
    fused, kept, _ = prepare(plain, ["step-in-backward"])  # a copy: new layers keep their initial values
    fused_settings = step_settings_for(kept, settings)
    plain, fused = plain.double(), fused.double()  # after the methods: some add layers of their own
    assert fused_settings.step_in_backward and not settings.step_in_backward
    before = [t.clone() for t in plain.state_dict().values()]
    a = _weights_after(plain, settings, optimizer)
    b = _weights_after(fused, fused_settings, optimizer)
    assert any(not torch.equal(x, y) for x, y in zip(before, a, strict=True))  # it trained
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_two_forwards_before_one_backward_are_stepped_once():
    """Two calls of the model in one loss: each weight's gradient is the sum over both calls."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=10).double()
    other = create_model("cifar_resnet8", num_classes=10).double()
    other.load_state_dict(model.state_dict())

    class Twice(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x) + self.m(x.flip(-1))

    a, b = Twice(model), Twice(other)
    _weights_after(a, StepSettings(), "sgd")
    _weights_after(b, StepSettings(step_in_backward=True), "sgd")
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), other.state_dict().values(), strict=True))


def test_gradients_are_freed_as_they_are_used():
    """A real (not fake) tracked step: no gradient is left at the end of backward, and the peak
    is lower by about every gradient but the largest."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)], nn.Linear(512, 10))
    x, y = torch.randn(4, 512), torch.randint(0, 10, (4,))
    peaks = {}
    for fused in (False, True):
        opt = make_optimizer("sgd", model.parameters())
        train_step(model, x, y, opt)  # warm-up: optimizer state exists, as in every later step
        with MemoryTracker() as tr:
            train_step(model, x, y, opt, StepSettings(step_in_backward=fused), tracker=tr)
        peaks[fused] = tr.report().peak_bytes
    grads = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    assert peaks[False] - peaks[True] >= 0.9 * (grads - largest), peaks


def test_fp16_and_a_grad_scaler_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="cannot run with fp16.*use bf16"):
        prepare(create_model("cifar_resnet8"), ["precision:dtype=fp16", "step-in-backward"])
    model = create_model("cifar_resnet8", num_classes=10)
    opt = make_optimizer("sgd", model.parameters())
    with pytest.raises(ConfigError, match="GradScaler"):
        train_step(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), opt, StepSettings(step_in_backward=True),
                   scaler=torch.amp.GradScaler("cpu"))  # fmt: skip


@pytest.mark.parametrize("name", ["shared", "cifar_resnet8"])
def test_adam_stepped_in_chunks_gives_the_plain_weights(name, monkeypatch):
    """Large parameters of Adam/AdamW are stepped in pieces in backward: every piece sees the same
    step count and the same arithmetic, so the weights equal the plain step's (float64)."""
    from edgetrain.core import step as core_step

    monkeypatch.setattr(core_step, "CHUNK_NUMEL", 100)  # every conv here is larger: all are chunked
    torch.manual_seed(0)
    model = (Shared() if name == "shared" else create_model(name, num_classes=10)).double()
    other = create_model(name, num_classes=10).double() if name != "shared" else Shared().double()
    other.load_state_dict(model.state_dict())
    a = _weights_after(model, StepSettings(), "adamw")
    b = _weights_after(other, StepSettings(step_in_backward=True), "adamw")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_adamw_in_backward_is_not_heavier_than_plain():
    """Adam's denominator is as large as its parameter: stepped whole in backward it lands on the
    activation peak (vgg11_bn: +18 %); in chunks the peak is plain's less the gradients freed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.ReLU(), nn.Linear(1024, 10))  # 3.1M weights
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    peaks = {}
    for fused in (False, True):
        opt = make_optimizer("adamw", model.parameters())
        train_step(model, x, y, opt)  # the moments exist
        with MemoryTracker() as tr:
            train_step(model, x, y, opt, StepSettings(step_in_backward=fused), tracker=tr)
        peaks[fused] = tr.report().peak_bytes
    big = 3 * 32 * 32 * 1024 * 4
    assert peaks[True] <= peaks[False] - 0.8 * big, peaks  # its gradient freed, no full-size denominator
