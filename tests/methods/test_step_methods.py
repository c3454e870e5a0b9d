"""Checkpointing, precision, micro-batching and freezing: exactness where promised, memory saved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSettings, make_optimizer, train_step
from edgetrain.methods.base import apply_method_, parse_spec, step_settings_for
from edgetrain.models import create_model
from edgetrain.planning.estimate import estimate
from edgetrain.train.validate import compare_case


def _step(model, x, y, settings: StepSettings | None = None):
    opt = make_optimizer("sgd", model.parameters(), lr=0.1)
    train_step(model, x, y, opt, settings or StepSettings())
    return model


def test_checkpoint_gives_the_same_step_and_bn_stats():
    torch.manual_seed(0)
    base = create_model("cifar_resnet20")
    ck = copy.deepcopy(base)
    assert apply_method_(ck, parse_spec("checkpoint")) == ["stem"] + [f"layers.{i}" for i in range(9)]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _step(base, x, y)
    _step(ck, x, y)
    for (n, a), b in zip(ck.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), n  # same names, same values
    assert list(ck.state_dict()) == list(base.state_dict())


def test_checkpoint_vgg_stage_segments():
    m = create_model("vgg11_bn")
    assert apply_method_(m, parse_spec("checkpoint")) == ["features"]
    plain = estimate(create_model("vgg11_bn"), (3, 64, 64), 8).predicted.saved_activation_bytes
    ck = estimate(m, (3, 64, 64), 8).predicted.saved_activation_bytes
    assert ck < 0.3 * plain


# bf16 on the CPU: convs save bf16 inputs and bf16 weight copies, BatchNorm stays fp32 -> ~0.65
@pytest.mark.parametrize(
    "spec, at_most", [("checkpoint", 0.6), ("precision:dtype=bf16", 0.7), ("microbatch:micro_batches=4", 0.3)]
)
def test_methods_shrink_saved_activations(spec, at_most):
    m = create_model("resnet18")
    plain = estimate(m, (3, 128, 128), 32).predicted.saved_activation_bytes
    got = estimate(m, (3, 128, 128), 32, methods=[spec]).predicted.saved_activation_bytes
    assert got < at_most * plain


def test_microbatch_keeps_the_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,))
    grads = []
    for k in (1, 4):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        settings = step_settings_for([parse_spec(f"microbatch:micro_batches={k}")]) if k > 1 else StepSettings()
        opt.zero_grad()
        for xc, yc in zip(x.chunk(k), y.chunk(k), strict=True):
            (nn.functional.cross_entropy(m(xc), yc) * len(xc) / len(x)).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        assert settings.micro_batches == k
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_train_step_microbatch_equals_full_batch_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _step(a, x, y)
    _step(b, x, y, StepSettings(micro_batches=4))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_freeze_prefix():
    m = create_model("resnet18")
    apply_method_(m, parse_spec("freeze:upto=layer2"))
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2") for n in frozen)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    _step(m, torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters() if n in before)
    plain = estimate(create_model("resnet18"), (3, 64, 64), 16).predicted
    fr = estimate(create_model("resnet18"), (3, 64, 64), 16, methods=["freeze:upto=layer2"]).predicted
    assert fr.saved_activation_bytes < 0.5 * plain.saved_activation_bytes
    assert fr.peak_by_category["optimizer"] < plain.peak_by_category["optimizer"]


def test_freeze_unknown_layer_is_clear():
    from edgetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="no top-level layer 'layer9'; this model has conv1"):
        apply_method_(create_model("resnet18"), parse_spec("freeze:upto=layer9"))


@pytest.mark.parametrize(
    "spec",
    [
        "checkpoint",
        "precision:dtype=bf16",
        "microbatch:micro_batches=2",
        "reversible",
        "freeze:upto=layers",
        "step-in-backward",
    ],
)
def test_estimate_agrees_with_measured_per_method(spec):
    """Tensor level, and this host's process level (a fresh process's peak RSS) within 5 %."""
    r = compare_case("cifar_resnet20", 16, 32, [spec])
    assert abs(r["tensor_err"]) <= 0.05, r
    assert abs(r["process_err"]) <= 0.05, r
    assert r["pred_saved"] == pytest.approx(r["meas_saved"], rel=0.05)


@pytest.mark.parametrize(
    ("model", "methods"),
    [
        ("mobilenet_v2", ["checkpoint"]),  # the peak in a depthwise convolution's backward: oneDNN's copies
        ("resnet18", ["compress:bits=4"]),
        ("resnet18", ["tucker2:ratio=0.25", "compress:bits=2", "step-in-backward"]),
        ("resnet18", ["microbatch:micro_batches=4", "checkpoint"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "+".join(v),
)
def test_planned_steps_at_the_process_level_err_high_and_within_5_percent(model, methods):
    """The step a plan runs, in a fresh process: its peak RSS is never above this host's prediction."""
    r = compare_case(model, 8, 112, methods)
    assert r["tensor_err"] == pytest.approx(0, abs=1e-3), r
    assert 0 <= r["process_err"] <= 0.05, r


def test_micro_batch_risk_follows_the_images_batchnorm_sees():
    """Micro-batches of one image each cost 17 points on digits (bench/levers.txt), of four or more
    none: the risk is the images' (known from the batch), in the plan, its levers and the planner."""
    from edgetrain.devices.store import get_device
    from edgetrain.methods.base import spec_of
    from edgetrain.planning import Plan
    from edgetrain.planning.planner import step_wide_options
    from edgetrain.planning.record import Choices, PlanRequest

    risks = {}
    for k in (4, 16, 32, 64):
        plan = Plan(PlanRequest(batch_size=64), Choices([f"microbatch:micro_batches={k}"]))
        again = Plan.from_dict(plan.to_dict())
        (c,) = again.choices.methods
        assert spec_of(c) == f"microbatch:micro_batches={k}" and c.images == 64 // k  # not part of the spec
        assert again.choices.levers()[0]["risk"] == c.risk
        risks[k] = c.risk
    assert risks[4] == risks[16] == 2 and risks[32] > risks[16] and risks[64] > risks[32]
    assert parse_spec("microbatch:micro_batches=64").risk == 2  # the batch not known: the middle rank
    for has_bn in (True, False):
        options = step_wide_options(get_device("jetson-nano"), 64, has_bn)
        effect = {g.configs[0].micro_batches: g.effects[0] for g in options if g.label().startswith("microbatch")
                  and len(g.configs) == 1}  # fmt: skip
        assert effect[64].risk == (risks[64] if has_bn else 0) and effect[4].risk == (2 if has_bn else 0)
        assert ("BatchNorm normalizes over 1 image" in effect[64].reason) == has_bn


def test_one_image_micro_batches_are_weighed_as_a_change_of_the_layers():
    """One image a micro-batch under BatchNorm risks more than any change of the layers: only at
    `--allow architecture` (and without BatchNorm, where nothing is normalized, at every level)."""
    from edgetrain.core.step import StepSpec
    from edgetrain.devices.store import get_device
    from edgetrain.memory.predict import num_classes_of
    from edgetrain.methods.base import LAYER_CHANGE_RISK, change_level
    from edgetrain.methods.precision import MicrobatchConfig
    from edgetrain.planning.planner import Planner
    from edgetrain.planning.record import Choices, PlanRequest
    from edgetrain.planning.search import estimate_plan

    assert change_level(MicrobatchConfig(8, images=1)) == "architecture" and MicrobatchConfig(8, images=1).risk > 7
    assert change_level(MicrobatchConfig(4, images=2)) == "lossy" and LAYER_CHANGE_RISK == 7
    model, profile = create_model("cifar_resnet8"), get_device("jetson-nano")
    plain = estimate_plan(model, Choices(), PlanRequest(batch_size=8, input_shape=(3, 32, 32)), profile)
    spec = StepSpec((3, 32, 32), 8, num_classes_of(model))
    splits = {}
    for allow in ("lossy", "architecture"):
        settings = Planner(model, spec, profile, "speed", plain, allow).settings()
        splits[allow] = {c.micro_batches for g in settings for c in g.configs if c.name == "microbatch"}
    assert max(splits["lossy"]) == 4 and max(splits["architecture"]) == 8
