"""Optimizer state kept in bf16 or 8 bits: the codecs' error bounds, the bytes kept between steps,
the update against full-precision state, exactness of the per-parameter stepping, checkpoints,
and a plan that changes mid-run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain.core.packed_state import is_packed, packed_state, unpack_state
from edgetrain.core.step import StepSettings, make_optimizer, optimizer_state_tensors, train_step
from edgetrain.errors import ConfigError
from edgetrain.methods.base import parse_spec, spec_of, step_settings_for
from edgetrain.methods.optim_state import BLOCK, SCALE, Bf16State, Int8State
from edgetrain.planning.estimate import estimate


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 16, 16, dtype=torch.float64, generator=g), torch.randint(0, 10, (16,), generator=g)


def _train(model, optimizer: str, settings: StepSettings, steps: int = 4, lr: float = 0.05):
    opt = make_optimizer(optimizer, model.parameters(), lr=lr)
    x, y = _data()
    for _ in range(steps):
        train_step(model, x, y, opt, settings)
    return model, opt


def test_bf16_rounds_to_bfloat16_and_keeps_the_dtype():
    v = torch.randn(1000, dtype=torch.float64) * 1e-3
    codec = Bf16State()
    parts = codec.pack("momentum_buffer", v)
    assert parts["v"].dtype == torch.int16  # a checkpoint loads it as it is (not cast back to fp32)
    back = torch.empty_like(v)
    codec.unpack("momentum_buffer", parts, back)
    assert torch.equal(back, v.to(torch.bfloat16).to(v.dtype))


def test_int8_error_is_half_a_level_and_second_moments_stay_bf16():
    g = torch.Generator().manual_seed(0)
    n = 3 * BLOCK + 17  # a last block padded
    v = torch.randn(n, generator=g) * torch.logspace(-4, 0, n)
    codec = Int8State()
    codec.chunk = 2  # several passes, the last one short
    parts = codec.pack("exp_avg", v)
    assert parts["q"].dtype == torch.int8 and parts["s"].numel() == 4
    scale = parts["s"].flatten().repeat_interleave(BLOCK)[:n]
    back = torch.empty_like(v)
    codec.unpack("exp_avg", parts, back)
    err = (back - v).abs()
    assert (err <= scale / 127 / 2 + 1e-7).all()  # the nearest of 255 levels of its block
    sq = v.square()
    codec.unpack("exp_avg_sq", codec.pack("exp_avg_sq", sq), back)
    assert torch.equal(back, sq.bfloat16().float())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_the_state_kept_between_steps_shrinks_by_the_stated_factor(optimizer, dtype):
    plain = _train(_net(), optimizer, StepSettings())[1]
    packed = _train(_net(), optimizer, StepSettings(optimizer_state=dtype))[1]
    nbytes = lambda o: sum(t.numel() * t.element_size() for t in optimizer_state_tensors(o) if t.dim())  # noqa: E731
    ratio = nbytes(packed) / (nbytes(plain) / 2)  # the plain state is float64 here: as float32, half of it
    assert is_packed(packed) and not is_packed(plain)
    int8 = (1 + 4 / BLOCK) / 4  # int8 codes and a float32 scale per block; Adam's second moment in bf16
    expect = {"bf16": 0.5, "int8": int8 if optimizer == "sgd" else (int8 + 0.5) / 2}[dtype]
    assert ratio == pytest.approx(expect, rel=0.08) and ratio <= SCALE[dtype] * 1.08  # last blocks are padded


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype, tol", [("bf16", 0.01), ("int8", 0.05)])
def test_weights_after_steps_are_near_the_full_precision_state(optimizer, dtype, tol):
    """How far the weights moved in 6 steps, and how far the rounded state takes them from there."""
    start = _net().state_dict()
    ref = _train(_net(), optimizer, StepSettings(), steps=6)[0].state_dict()
    got = _train(_net(), optimizer, StepSettings(optimizer_state=dtype), steps=6)[0].state_dict()
    for n in (n for n in ref if n.endswith("weight")):
        moved, off = (ref[n] - start[n]).norm(), (got[n] - ref[n]).norm()
        assert 0 < off <= tol * moved, (n, float(off / moved))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_stepping_in_backward_and_micro_batches_give_the_same_weights(optimizer):
    """Packing is per parameter and deterministic: the step in backward (each parameter when its
    gradient is complete), with micro-batches, lands on the very same weights."""
    both = StepSettings(optimizer_state="int8", step_in_backward=True, micro_batches=2)
    ref = StepSettings(optimizer_state="int8", micro_batches=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    one, two = _train(copy.deepcopy(net), optimizer, ref)[0], _train(copy.deepcopy(net), optimizer, both)[0]
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_keeps_the_packed_state_and_the_run_goes_on():
    model, opt = _train(_net(), "adamw", StepSettings(optimizer_state="int8"), steps=2)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = make_optimizer("adamw", twin.parameters(), lr=0.05)
    opt2.load_state_dict(saved)  # torch casts every state tensor to the weights' dtype
    x, y = _data()
    for m, o in ((model, opt), (twin, opt2)):
        train_step(m, x, y, o, StepSettings(optimizer_state="int8"))
    dtypes = {t.dtype for t in optimizer_state_tensors(opt2)}
    assert {torch.int8, torch.int16} <= dtypes and torch.float64 not in dtypes  # packed parts as they were
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_plan_without_the_lever_unpacks_the_state_and_keeps_the_momentum():
    model, opt = _train(_net(), "sgd", StepSettings(optimizer_state="bf16"), steps=2)
    expect = {}
    for p, s in opt.state.items():
        copy_ = dict(s)
        unpack_state(copy_, p)
        expect[p] = copy_["momentum_buffer"]
    with packed_state(opt, "fp32"):
        pass
    assert not is_packed(opt)
    for p, s in opt.state.items():
        assert torch.equal(s["momentum_buffer"], expect[p])


def test_spec_and_bad_input():
    c = parse_spec("optim-state:dtype=int8")
    assert spec_of(c) == "optim-state:dtype=int8" and spec_of(parse_spec("optim-state")) == "optim-state:dtype=bf16"
    assert step_settings_for([c]).optimizer_state == "int8" and c.risk > parse_spec("optim-state").risk > 0
    with pytest.raises(ConfigError, match="dtype must be one of bf16, int8"):
        parse_spec("optim-state:dtype=int4")
    model = _net()
    opt = make_optimizer("sgd", model.parameters())
    with pytest.raises(ConfigError, match="optimizer state 'fp8' unknown: use one of fp32, bf16, int8"):
        train_step(model, *_data(), opt, StepSettings(optimizer_state="fp8"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_estimate_sees_the_packed_state(optimizer):
    """The fake-tensor step runs the same code: where the state is most of the step (8 equal layers),
    the peak drops by most of what packing saves; one layer's state is whole while it is stepped."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), *(nn.Linear(768, 768) for _ in range(8)))
    plain = estimate(m, (3, 16, 16), 8, optimizer)
    state = plain.predicted.peak_by_category["optimizer"]
    for dtype in SCALE:
        packed = estimate(m, (3, 16, 16), 8, optimizer, methods=[f"optim-state:dtype={dtype}"])
        saved = plain.predicted.peak_total_bytes - packed.predicted.peak_total_bytes
        assert saved >= (1 - SCALE[dtype]) * state - 2.5 * state / 8, dtype  # less one layer's unpacked state


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("levers", [["optim-state:dtype=int8"], ["optim-state:dtype=bf16", "step-in-backward"]])
def test_the_prediction_is_the_real_step_to_the_byte(optimizer, levers):
    """A real tracked step (after a real warm-up step) holds what the fake one (its state primed) predicts."""
    from edgetrain.core.step import StepSpec
    from edgetrain.memory.measure import tracked_step

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), *(nn.Linear(768, 768) for _ in range(3)), nn.ReLU(), nn.Linear(768, 10))
    spec = StepSpec((3, 16, 16), 8, 10, optimizer, step_settings_for([parse_spec(s) for s in levers]))
    real, fake = tracked_step(m, spec, fake=False), tracked_step(m, spec, fake=True)
    assert (real.peak_bytes, real.peak_by_category) == (fake.peak_bytes, fake.peak_by_category)


def test_fp16_loss_scaling_steps_through_the_packed_state():
    """A GradScaler calls `optimizer.step()` after unscaling: the packed stepping is what it calls."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    weights = []
    for state in ("fp32", "bf16"):
        m = copy.deepcopy(net)
        opt, scaler = make_optimizer("sgd", m.parameters(), lr=0.1), torch.amp.GradScaler("cpu")
        for _ in range(3):
            train_step(m, x, y, opt, StepSettings(precision="fp16", optimizer_state=state), scaler=scaler)
        assert is_packed(opt) == (state == "bf16")
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    start = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert 0 < (weights[1] - weights[0]).norm() <= 0.01 * (weights[0] - start).norm()


def test_an_lr_schedule_sees_every_step_and_keeps_its_wrapper(recwarn):
    """A scheduler wraps `optimizer.step` to count calls: the packed stepping calls through it and
    puts it back, so it neither warns nor loses its wrapper."""
    model = _net()
    opt = make_optimizer("sgd", model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    wrapper = opt.step
    for _ in range(2):
        train_step(model, *_data(), opt, StepSettings(optimizer_state="int8"))
        sched.step()
    assert opt.step == wrapper and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)]
