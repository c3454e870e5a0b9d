from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.memory.measure import tracked_step
from edgetrain.memory.tracker import MemoryTracker
from edgetrain.models import create_model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10))


def test_categories_of_a_known_step():
    model = _mlp()
    r = tracked_step(model, StepSpec((3, 8, 8), 32, 10), fake=False)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert r.peak_by_category["parameters"] == params
    assert r.peak_by_category["optimizer"] == params  # SGD momentum: one buffer per parameter
    assert r.peak_by_category["inputs"] == 32 * 3 * 8 * 8 * 4 + 32 * 8
    # held at the end of forward: ReLU's output (32x256), saved by ReLU's backward and by
    # Linear2 but stored once; log-softmax's output (32x10); the loss and NLL's total weight.
    assert r.saved_activation_bytes == 32 * 256 * 4 + 32 * 10 * 4 + 4 + 4
    assert r.peak_phase in ("forward", "backward", "optimizer")


def test_fake_prediction_equals_real_measurement():
    model = create_model("cifar_resnet8")
    spec = StepSpec((3, 32, 32), 16, 10)
    fake = tracked_step(model, spec, fake=True)
    real = tracked_step(model, spec, fake=False)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.saved_activation_bytes == real.saved_activation_bytes
    assert fake.peak_by_category == real.peak_by_category


def test_real_step_does_not_train_the_given_model():
    model = create_model("cifar_resnet8")
    before = [p.detach().clone() for p in model.parameters()]
    tracked_step(model, StepSpec((3, 32, 32), 4, 10), fake=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_frees_are_seen():
    with MemoryTracker() as tr:
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        c = torch.empty(500)
    assert tr.report().peak_bytes == 3000 * 4
    assert tr.live_bytes == 2500 * 4
    del b, c


def test_round_to_models_allocation_granularity():
    with MemoryTracker(round_to=512) as tr:
        x = torch.empty(3)  # 12 bytes -> one 512-byte block
    assert tr.report().peak_bytes == 512
    del x


def test_timeline_ends_where_the_live_bytes_are():
    with MemoryTracker() as tr:
        keep = torch.ones(100)
        tmp = keep * 2
        del tmp
    rep = tr.report()
    _, series = rep.timeline()
    assert sum(v[-1] for v in series.values()) == 400
    assert max(sum(v[i] for v in series.values()) for i in range(len(rep.events))) == rep.peak_bytes == 800
    del keep


def _allocator_peak(fn) -> int:
    """The CPU allocator's own peak during `fn()` above what was live before (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, n in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += n
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("methods", [[], ["checkpoint"]], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("groups", [1, 48], ids=["dense", "depthwise"])
def test_the_within_op_peak_is_the_cpu_allocators_peak(groups, methods):
    """oneDNN copies a convolution's operands, and BatchNorm backward holds a buffer: no tensor
    holds them, so the live-tensor peak misses them; the within-op figure matches the allocator."""
    from torch import nn

    from edgetrain.core.step import make_optimizer, train_step
    from edgetrain.memory.guard import BudgetGuard
    from edgetrain.methods.base import prepare

    torch.manual_seed(0)

    def block(stride):
        return nn.Sequential(nn.Conv2d(48, 48, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(48),
                             nn.ReLU6(inplace=True), nn.Conv2d(48, 48, 1, bias=False), nn.BatchNorm2d(48))  # fmt: skip

    net = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), *(block(s) for s in (1, 2, 1)), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(48, 10))  # fmt: skip
    net, _, settings = prepare(net, methods, shapes_only=True)
    opt = make_optimizer("sgd", net.parameters())
    x, y = torch.randn(16, 3, 96, 96), torch.randint(0, 10, (16,))
    train_step(net, x, y, opt, settings)
    with BudgetGuard(None, net, opt, (x, y)) as g:
        before = g.live_bytes
        train_step(net, x, y, opt, settings, tracker=g)
    rep = g.report()
    truth = before + _allocator_peak(lambda: train_step(net, x, y, opt, settings))
    assert rep.peak_bytes < truth  # the tensors alone miss the ops' inner copies
    assert abs(rep.within_op_peak_bytes / truth - 1) < 0.01


def test_rise_in_a_phase_is_above_where_the_phase_began():
    tr = MemoryTracker()
    with tr:
        keep = torch.ones(100)  # 400 B before the phase
        with tr.in_phase("optimizer"):
            a = torch.ones(50)  # +200
            b = torch.ones(25)  # +100: 300 above the phase's start
            del a, b
            c = torch.ones(10)  # +40 after the frees
        d = torch.ones(1000)  # after the phase: not its rise
    rep = tr.report()
    assert rep.rise_in("optimizer") == 300
    assert rep.rise_in("backward") == 0  # a phase that did not run
    del keep, c, d


def test_an_sgd_step_rises_by_about_its_largest_parameter():
    """What the planner reads as torch's step's own temporaries (momentum SGD with weight decay)."""
    model = _mlp()
    r = tracked_step(model, StepSpec((3, 8, 8), 32, 10), fake=True)
    largest = max(p.numel() * 4 for p in model.parameters())
    assert 0 < r.rise_in("optimizer") <= 2 * largest
