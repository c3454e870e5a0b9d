"""Low-rank layers: full-rank factorizations reproduce the layer, CP re-fusion equals unfused CP
with fewer bytes, partial update leaves frozen factors untouched, and the plan/estimate paths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSpec, make_optimizer, train_step
from edgetrain.errors import ConfigError
from edgetrain.memory.measure import flop_hooks, tracked_step
from edgetrain.methods import decompose as dc
from edgetrain.methods import factorize as fz
from edgetrain.methods import lowrank_layers as ll
from edgetrain.methods.base import apply_method_, parse_spec, prepare, set_exportable
from edgetrain.planning import Plan, apply_plan_
from edgetrain.planning.estimate import estimate

VARIANTS = {
    "plain": dict(kernel_size=3),
    "stride2-pad1": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "groups4": dict(kernel_size=3, padding=1, groups=4),
    "rect-5x3": dict(kernel_size=(5, 3), padding=(2, 1), stride=(2, 1)),
    "1x1-stride2": dict(kernel_size=1, stride=2),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_rank_tucker2_reproduces_the_conv(variant):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, **VARIANTS[variant])
    new = dc.tucker2_conv(conv, parse_spec("tucker2:rank=1000"))
    x = torch.randn(2, 16, 13, 11)
    assert _rel(new(x), conv(x)) <= 1e-4
    assert new.conversion["weight_error"] <= 1e-5


def test_tucker2_keeps_reflect_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
    new = dc.tucker2_conv(conv, parse_spec("tucker2:rank=16"))
    x = torch.randn(2, 16, 9, 9)
    assert _rel(new(x), conv(x)) <= 1e-4


def test_full_rank_linear_reproduces_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    new = dc.lowrank_linear(lin, parse_spec("tucker2:rank=64"))
    x = torch.randn(5, 64)
    assert _rel(new(x), lin(x)) <= 1e-4


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "1x1-stride2"])
def test_cp_chain_computes_its_dense_kernel(variant):
    """kx1 dw . 1xk dw with split stride/padding/dilation is exactly a conv with the CP kernel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, **VARIANTS[variant])
    new = dc.cp_conv(conv, parse_spec("cp:rank=24,iters=3"))
    x = torch.randn(2, 16, 13, 11)
    ref = nn.functional.conv2d(
        x, ll.dense_weight(new), new.last.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    assert _rel(new(x), ref) <= 1e-5


def test_cp_als_recovers_an_exact_low_rank_kernel():
    g = torch.Generator().manual_seed(1)
    factors = [torch.randn(d, 6, generator=g, dtype=torch.float64) for d in (24, 16, 3, 3)]
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(fz.cp_rebuild(factors))
    new = dc.cp_conv(conv, parse_spec("cp:rank=6,iters=200"))
    x = torch.randn(2, 16, 8, 8)
    assert new.conversion["weight_error"] <= 1e-4
    assert _rel(new(x), conv(x)) <= 1e-4


def test_hooi_sweeps_do_not_increase_the_error():
    w = torch.randn(32, 24, 3, 3, generator=torch.Generator().manual_seed(2))
    errs = [fz.relative_error(fz.tucker2_rebuild(*fz.tucker2(w, 12, 10, iters)), w) for iters in (0, 4)]
    assert errs[1] <= errs[0] + 1e-12 and errs[1] < 1


def test_rank_for_energy_counts_singular_values():
    u, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    w = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0] + [0.0] * 17, dtype=torch.float64)) @ u.T
    assert fz.rank_for_energy(w, 0, 9 / 14) == 1  # 9 of 9+4+1
    assert fz.rank_for_energy(w, 0, 0.92) == 2  # 13 of 14
    assert fz.rank_for_energy(w, 0, 1.0) == 3


@pytest.mark.parametrize("spec", ["tucker2:ratio=0.5", "tucker2:ratio=0.25", "cp:ratio=0.5,iters=2"])
def test_flop_ratio_is_met(spec):
    model = nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.Linear(16, 16)
    )
    counts_before, counts_after = {}, {}
    new = prepare(model, [spec])[0]
    for m, counts in ((model, counts_before), (new, counts_after)):
        hs = flop_hooks(m[:2], counts)
        m[:2](torch.randn(1, 64, 16, 16))
        for h in hs:
            h.remove()
    want = float(spec.split("ratio=")[1].split(",")[0])
    got = sum(counts_after.values()) / sum(counts_before.values())
    assert abs(got - want) <= 0.08 * want


def test_classifier_and_stem_stay_dense():
    from edgetrain.models import create_model

    model = prepare(create_model("cifar_resnet20", 10), ["tucker2"])[0]
    assert isinstance(model.stem[0], nn.Conv2d) and isinstance(model.fc, nn.Linear)
    assert sum(isinstance(m, ll.Tucker2Conv2d) for m in model.modules()) == 20  # 18 3x3 + 2 1x1 shortcuts
    again = prepare(model, ["tucker2"])[0]  # nothing left to factorize: the parts are never factorized
    assert sum(isinstance(m, ll.Tucker2Conv2d) for m in again.modules()) == 20


def _tiny_vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.mark.parametrize("recompute", ["depthwise", "all"])
def test_refused_cp_equals_unfused_with_fewer_bytes(recompute):
    torch.manual_seed(0)
    unfused = prepare(_tiny_vgg(), ["cp:ratio=0.5,iters=3"])[0]
    refused = copy.deepcopy(unfused)
    for m in refused.modules():
        if isinstance(m, ll.CPConv2d):
            m.refuse, m.recompute = True, recompute
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    outs, grads = [], []
    for m in (unfused, refused):
        out = m(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out)
        grads.append([p.grad for p in m.parameters()])
    assert _rel(outs[1], outs[0]) <= 1e-5
    for a, b in zip(*grads, strict=True):
        assert _rel(b, a) <= 1e-5
    spec = StepSpec((3, 16, 16), 4, 10)
    saved = [tracked_step(m, spec, fake=False).saved_activation_bytes for m in (unfused, refused)]
    assert saved[1] < saved[0]


def test_partial_update_leaves_frozen_factors_bitwise_unchanged():
    torch.manual_seed(0)
    model = prepare(_tiny_vgg(), ["tucker2:ratio=0.5", "partial:factor=core"])[0]
    layers = [m for m in model.modules() if isinstance(m, ll.Tucker2Conv2d)]
    before = {id(p): p.detach().clone() for m in layers for p in (m.first.weight, m.core.weight, m.last.weight)}
    opt = make_optimizer("sgd", model.parameters(), lr=0.1)
    for _ in range(3):
        train_step(model, torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), opt)
    for m in layers:
        assert torch.equal(m.first.weight, before[id(m.first.weight)])
        assert torch.equal(m.last.weight, before[id(m.last.weight)])
        assert not torch.equal(m.core.weight, before[id(m.core.weight)])


def test_partial_update_gradients_match_plain_autograd():
    torch.manual_seed(0)
    full = prepare(_tiny_vgg(), ["tucker2:ratio=0.5"])[0]
    part = prepare(full, ["partial:factor=last"])[0]
    for m in full.modules():  # the same freezing, without the input-free Function
        if isinstance(m, ll.Tucker2Conv2d):
            m.first.weight.requires_grad_(False)
            m.core.weight.requires_grad_(False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (full, part):
        nn.functional.cross_entropy(m(x), y).backward()
    for a, b in zip(full.parameters(), part.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert _rel(b.grad, a.grad) <= 1e-5


@pytest.mark.parametrize("factor", ["first", "core", "last"])
def test_partial_update_saves_fewer_bytes_than_full_factorized_training(factor):
    full = estimate(_tiny_vgg(), (3, 32, 32), 8, methods=["tucker2:ratio=0.5"])
    part = estimate(_tiny_vgg(), (3, 32, 32), 8, methods=["tucker2:ratio=0.5", f"partial:factor={factor}"])
    assert part.predicted.saved_activation_bytes < full.predicted.saved_activation_bytes


def test_partial_without_factorized_layers_is_refused():
    with pytest.raises(ConfigError, match="tucker2"):
        prepare(_tiny_vgg(), ["partial"])


@pytest.mark.parametrize(
    "methods",
    [
        ["tucker2:ratio=0.5"],
        ["cp-refused:ratio=0.5,iters=2"],
        ["tucker2", "partial"],
        ["tucker2:reg=srip"],
        ["tucker2:refuse=true", "partial:factor=core"],
    ],  # fmt: skip
)
def test_estimate_equals_a_measured_step(methods):
    model, _, settings = prepare(_tiny_vgg(), methods)
    spec = StepSpec((3, 32, 32), 8, 10, settings=settings)
    real = tracked_step(model, spec, fake=False).peak_bytes
    fake = tracked_step(model, spec, fake=True).peak_bytes
    assert abs(fake - real) <= 0.05 * real


@pytest.mark.parametrize(
    "spec, name", [("cp:refuse=true,iters=2", "cp refuse"), ("tucker2:refuse=true", "tucker2 refuse")]
)
def test_set_exportable_turns_refusion_and_partial_off(spec, name):
    model = prepare(_tiny_vgg(), [spec, "partial"])[0]
    off = set_exportable(model)
    assert name in off and "partial" in off
    assert not any(getattr(m, "refuse", False) for m in model.modules())


def test_plan_with_low_rank_applies_to_a_fresh_model(tmp_path):
    from edgetrain.planning import plan_for

    plan = plan_for(_tiny_vgg(), (3, 32, 32), 8, "cpu", methods=["tucker2:ratio=0.5"])
    plan.choices.layers = {"2.core": parse_spec("compress:bits=4")}  # a per-layer choice inside a factorized layer
    plan.choices.shapes = {}
    fresh = _tiny_vgg()
    apply_plan_(fresh, Plan.load(plan.save(tmp_path / "p.yaml")))
    assert isinstance(fresh[2], ll.Tucker2Conv2d) and type(fresh[2].core).__name__.startswith("Compressed")


def test_planner_refuses_methods_it_chooses_itself():
    from edgetrain.planning import plan_for

    with pytest.raises(ConfigError, match="low-rank"):
        plan_for(_tiny_vgg(), (3, 32, 32), 8, "cpu", methods=["checkpoint"])


@pytest.mark.parametrize("spec", ["tucker2:ratio=2", "tucker2:reg=l2", "cp:recompute=some", "partial:factor=middle"])
def test_bad_options_get_one_clear_line(spec):
    with pytest.raises(ConfigError, match=spec.split(":")[1].split("=")[0]):
        parse_spec(spec)


def test_conversion_report_measures_the_error():
    torch.manual_seed(0)
    dense = _tiny_vgg()
    exact = prepare(dense, ["tucker2:rank=1000"])[0]
    lossy = prepare(dense, ["tucker2:rank=2"])[0]
    x = torch.randn(8, 3, 16, 16)
    good, bad = dc.conversion_report(dense, exact, x), dc.conversion_report(dense, lossy, x)
    assert good["logits_error"] <= 1e-4 and good["top1_agreement"] == 1.0
    assert all(r["output_error"] <= 1e-4 for r in good["layers"].values())
    assert bad["logits_error"] > 1e-2 and min(r["output_error"] for r in bad["layers"].values()) > 1e-2


@pytest.mark.parametrize("spec", ["tucker2:budget=0.3", "cp:budget=0.4,init=random"])
def test_parameter_budget_is_met(spec):
    from edgetrain.models import create_model

    model = create_model("cifar_resnet20")
    new = prepare(model, [spec])[0]
    kept = sum(p.numel() for p in new.parameters()) / sum(p.numel() for p in model.parameters())
    budget = float(spec.split("budget=")[1].split(",")[0])
    assert budget - 0.03 <= kept <= budget


def test_unreachable_budget_is_one_clear_error():
    with pytest.raises(ConfigError, match="cannot be met"):
        prepare(_tiny_vgg(), ["tucker2:budget=0.01"])


def test_refused_cp_input_is_compressed_too():
    torch.manual_seed(0)
    base = estimate(_tiny_vgg(), (3, 32, 32), 8, methods=["cp-refused:iters=2"])
    packed = estimate(_tiny_vgg(), (3, 32, 32), 8, methods=["cp-refused:iters=2", "compress:bits=4"])
    assert packed.predicted.saved_activation_bytes < 0.3 * base.predicted.saved_activation_bytes
    only = prepare(_tiny_vgg(), ["cp-refused:iters=2"])[0]  # compress on the CP layer alone
    spec = StepSpec((3, 32, 32), 8, 10)
    before = tracked_step(only, spec, fake=False).saved_activation_bytes
    apply_method_(only, parse_spec("compress:bits=4"), layers="2.first")
    assert tracked_step(only, spec, fake=False).saved_activation_bytes < 0.8 * before
    model = prepare(_tiny_vgg(), ["cp-refused:iters=2"])[0]
    both = prepare(model, ["compress:bits=8"])[0]
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for m in (model, both):
        nn.functional.cross_entropy(m(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert nn.functional.cosine_similarity(*grads, dim=0) > 0.99


@pytest.mark.parametrize("variant", ["plain", "stride2-pad1", "dilation2", "groups4", "rect-5x3"])
@pytest.mark.parametrize("partial", [None, "first", "core"])
def test_refused_tucker2_equals_unfused_with_fewer_bytes(variant, partial):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, **VARIANTS[variant])
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), conv, nn.Flatten(), nn.LazyLinear(10))
    net(torch.randn(1, 3, 13, 11))
    specs = ["tucker2:ratio=0.5"] + ([f"partial:factor={partial}"] if partial else [])
    plain = prepare(net, specs)[0]
    assert isinstance(plain[2], ll.Tucker2Conv2d)
    refused = copy.deepcopy(plain)
    refused[2].refuse = True
    x, y = torch.randn(4, 3, 13, 11, requires_grad=True), torch.randint(0, 10, (4,))
    grads = []
    for m in (plain, refused):
        nn.functional.cross_entropy(m(x), y).backward()
        grads.append([x.grad.clone()] + [p.grad for p in m.parameters()])
        x.grad = None
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert _rel(b, a) <= 1e-5
    spec = StepSpec((3, 13, 11), 4, 10)
    saved = [tracked_step(m, spec, fake=False).saved_activation_bytes for m in (plain, refused)]
    assert saved[1] < saved[0] if partial in (None, "core") else saved[1] <= saved[0]
    assert tracked_step(refused, spec, fake=True).peak_bytes == tracked_step(refused, spec, fake=False).peak_bytes


def test_fresh_cp_factors_build_no_dense_weight_and_the_rebuild_stays_small():
    """Planning applies shapes-only twins (fresh factors): no weight error, so no dense weight per
    layer; and rebuilding a CP weight makes nothing near O·I·kh·R (a four-way einsum made
    O·I·kh·R first: 3.5 GB of RSS on resnet18 at ratio 1/4)."""
    from edgetrain.memory.tracker import MemoryTracker
    from edgetrain.methods import factorize as fz

    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    assert dc.cp_conv(conv, parse_spec("cp:ratio=0.25,init=random")).conversion["weight_error"] is None
    assert dc.cp_conv(conv, parse_spec("cp:ratio=0.25,iters=1")).conversion["weight_error"] > 0  # a conversion
    a, b, kh, kw = (torch.randn(n, 300) for n in (256, 256, 3, 3))
    with MemoryTracker() as tr:
        w = fz.cp_rebuild([a, b, kh, kw])
    assert w.shape == (256, 256, 3, 3)
    assert tr.report().peak_bytes <= 10 * w.numel() * 4  # the weight and the Khatri-Rao product; O·I·kh·R is 100x
    assert torch.allclose(w, torch.einsum("or,ir,hr,wr->oihw", a, b, kh, kw), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("spec", ["tucker2:ratio=0.25", "cp:ratio=0.25,iters=1"])
def test_shape_twins_fill_no_weight_and_fresh_factors_are_random(spec, monkeypatch):
    """The planner's twins (`for_shapes`) have the conversion's shapes and no fill at all (a random
    fill of vgg11_bn's U·V classifier took 0.4-1.2 s of each plan); factors for a run from scratch
    (`from_scratch`) are filled at random, every one, as a fresh layer is."""
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 64))
    config = parse_spec(spec)
    fills = []
    real = nn.init.kaiming_uniform_

    def counted(*a, **k):  # a fill of real memory (a layer built on the meta device fills nothing)
        fills.extend([] if (a[0] if a else k["tensor"]).is_meta else [1])
        return real(*a, **k)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", counted)
    shapes = {}
    for kind, c in (("convert", config), ("twin", config.for_shapes()), ("fresh", config.from_scratch())):
        m, fills[:] = copy.deepcopy(model), []
        m = prepare(m, [c])[0]
        shapes[kind] = [(n, p.shape) for n, p in m.named_parameters()]
        if kind == "twin":
            assert c.init == "shapes" and not fills
        if kind == "fresh":
            factors = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1]
            assert c.init == "random" and fills and len(factors) > 2
            assert all(p.std() > 0 and torch.isfinite(p).all() for p in factors)
    assert shapes["twin"] == shapes["convert"] == shapes["fresh"]
    with pytest.raises(ConfigError, match="init must be decompose or random"):  # no run trains unfilled memory
        parse_spec(f"{spec},init=shapes")
