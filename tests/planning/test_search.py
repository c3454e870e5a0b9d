"""The search: exact against brute force, plain when it fits, real steps under the budget, not-fit advice."""

from __future__ import annotations

import random
import re

import pytest
import torch

from edgetrain.core.step import StepSpec
from edgetrain.devices.store import get_device, save_profile
from edgetrain.errors import BudgetError
from edgetrain.memory.guard import tensor_budget
from edgetrain.memory.measure import tracked_step
from edgetrain.models import create_model
from edgetrain.planning import Plan, apply_plan_, plan_for
from edgetrain.planning.knapsack import brute_force, knapsack

MiB = 2**20


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_equals_brute_force(seed):
    rng = random.Random(seed)
    items = [[(rng.randint(0, 100), rng.random()) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 5))]
    cap = rng.randint(0, 300)
    got, best = knapsack(items, cap, buckets=64), brute_force(items, cap, buckets=64)
    if best is None:
        assert got is None
    else:
        choice, cost = got
        assert cost == pytest.approx(best)
        assert sum(items[u][k][0] for u, k in enumerate(choice)) <= cap  # rounding up keeps it feasible
        assert sum(items[u][k][1] for u, k in enumerate(choice)) == pytest.approx(cost)


def _profile(tmp_path, usable_mib: int, name: str = "tiny") -> str:
    p = get_device("cpu").replace(name=name, kind="cuda", usable_memory_bytes=usable_mib * MiB, workspace_bytes=0,
                                  allocator="cpu-malloc", bf16_supported=False, reserved_bytes={})  # fmt: skip
    return str(save_profile(p, name, tmp_path))


def test_plain_when_it_fits():
    p = plan_for(create_model("cifar_resnet8"), (3, 32, 32), 32, "gtx750-1gb")
    assert p.is_plain and p.overhead == 1.0 and p.candidates[0]["chosen"]
    assert "fits as it is" in p.reasons[0]


@pytest.mark.parametrize("model,size,batch,budget_mib", [
    ("cifar_resnet20", 32, 64, 30),
    ("mobilenet_v2", 64, 16, 70),
    ("resnet18", 64, 32, 175),
])  # fmt: skip
def test_the_plan_fits_a_real_step_under_the_guard(tmp_path, model, size, batch, budget_mib):
    device = _profile(tmp_path, budget_mib)
    m = create_model(model)
    p = plan_for(m, (3, size, size), batch, device, name=model)
    assert not p.is_plain and p.predicted.peak_device_bytes <= budget_mib * MiB
    settings = apply_plan_(m, p)
    report = tracked_step(
        m,
        StepSpec((3, size, size), batch, 10, settings=settings),
        fake=False,
        budget_bytes=tensor_budget(get_device(device)),
    )  # raises EdgeOOMError past the budget
    assert report.peak_bytes == pytest.approx(p.predicted.peak_total_bytes, rel=0.05)


def test_prefer_accuracy_avoids_lossy_methods_when_exact_ones_fit(tmp_path):
    device = _profile(tmp_path, 45)  # checkpointing fits (40 MiB); plain needs 100
    m = create_model("cifar_resnet20")
    exact = plan_for(m, (3, 32, 32), 64, device, prefer="accuracy")
    assert (
        exact.risk == 0 and exact.choices.layers and {c.name for c in exact.choices.layers.values()} == {"checkpoint"}
    )
    fast = plan_for(m, (3, 32, 32), 64, device, prefer="speed")
    assert fast.overhead <= exact.overhead


def test_nothing_fits_says_the_smallest_peak_and_what_to_do(tmp_path):
    with pytest.raises(BudgetError) as e:
        plan_for(create_model("resnet18"), (3, 224, 224), 8, "gtx750-1gb", budget_bytes=150 * MiB)
    msg = str(e.value)
    assert "nothing fits gtx750-1gb: the smallest peak reachable is" in msg and "budget of 150 MiB" in msg
    assert re.search(r"try -[bs] \d+ \(predicted to fit with that plan\)", msg) or "state alone do not fit" in msg


def _mlp():
    """Weights, gradients and momentum are nearly all of this net's step: only a lever on them helps."""
    from torch import nn

    torch.manual_seed(0)
    layers = [m for _ in range(6) for m in (nn.ReLU(), nn.Linear(1024, 1024))]
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1024), *layers, nn.ReLU(), nn.Linear(1024, 10))


@pytest.mark.parametrize("between", [0.5, 0.1])  # the modelled search's fit, and the exact lightest plan's
def test_the_optimizer_step_in_backward_is_chosen_when_the_gradients_do_not_fit(between):
    from edgetrain.planning.estimate import estimate

    peaks = [estimate(_mlp(), (3, 16, 16), 8, device="gtx750-1gb", methods=m).predicted.peak_device_bytes
             for m in ([], ["step-in-backward"])]  # fmt: skip
    budget = int(peaks[1] + between * (peaks[0] - peaks[1]))
    for allow in ("lossy", "architecture"):  # low-rank layers would fit too: not while this does
        p = plan_for(_mlp(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=budget, allow=allow)
        assert [c.name for c in p.choices.methods] == ["step-in-backward"] and not p.choices.layers, p.summary()
        assert p.predicted.peak_device_bytes == peaks[1] <= budget and p.risk == 0
        assert any("freed as soon as it is complete" in r for r in p.reasons)


def test_below_what_the_lightest_plan_holds_nothing_fits():
    with pytest.raises(BudgetError, match=r"smallest peak reachable is \d+ MiB \(optim-state:dtype=int8 \+ step-in-b"):
        plan_for(_mlp(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=60 * MiB)


def test_allow_exact_keeps_to_exact_levers(tmp_path):
    """With --allow exact the plan uses only levers that train the same model the same way."""
    from edgetrain.methods.base import change_level

    device = _profile(tmp_path, 45)  # checkpointing fits (40 MiB); plain needs 100
    plan = plan_for(create_model("cifar_resnet20"), (3, 32, 32), 64, device, allow="exact")
    assert plan.choices.configs() and {change_level(c) for c in plan.choices.configs()} == {"exact"}, plan.summary()
    assert plan.request.allow == "exact" and plan.risk == 0


def test_low_rank_layers_are_a_lever_only_when_architecture_is_allowed():
    """The wide net's weights do not fit below its lightest exact plan: by default the answer says
    which level would fit and with what; with --allow architecture the plan makes some layers U·V."""
    from edgetrain.planning.estimate import estimate

    levers = ["step-in-backward", "optim-state:dtype=int8"]  # the lightest at the default level
    lightest = estimate(_mlp(), (3, 16, 16), 8, device="gtx750-1gb", methods=levers)
    budget = lightest.predicted.peak_device_bytes - 12 * MiB
    with pytest.raises(BudgetError, match=r"nothing fits gtx750-1gb with --allow lossy: .*; fits with --allow "
                       r"architecture: .*tucker2:ratio=[\d.]+ x\d, \d+ MiB predicted$"):  # fmt: skip
        plan_for(_mlp(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=budget)
    plan = plan_for(_mlp(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=budget, allow="architecture")
    low = {n: c for n, c in plan.choices.layers.items() if c.name == "tucker2"}
    assert low and plan.predicted.peak_device_bytes <= budget and plan.risk >= 5, plan.summary()
    assert any("changes the layers, risk" in r for r in plan.reasons)
    model = _mlp()
    settings = apply_plan_(model, plan)  # from scratch: the layers are converted once, here
    report = tracked_step(model, StepSpec((3, 16, 16), 8, 10, settings=settings), fake=False)
    assert report.peak_bytes == pytest.approx(plan.predicted.peak_total_bytes, rel=0.01)


def test_an_unknown_allow_level_is_one_line():
    from edgetrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--allow must be one of exact, lossy, architecture .*got 'all'$"):
        plan_for(_mlp(), (3, 16, 16), 8, "gtx750-1gb", allow="all")


def test_the_frontier_is_the_pareto_front_of_the_candidates_with_the_chosen_plan_exact(tmp_path):
    device = _profile(tmp_path, 45)
    plan = plan_for(create_model("cifar_resnet20"), (3, 32, 32), 64, device, frontier=True)
    pts = plan.frontier
    plain = [p for p in pts if p["plan"] == "plain"]
    assert plain and plain[0]["time_factor"] == 1.0 and plain[0]["front"]  # nothing is faster than plain
    chosen = [p for p in pts if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["plan"] == plan.summary()
    assert chosen[0]["peak_device_bytes"] == plan.predicted.peak_device_bytes
    front = [p for p in pts if p["front"]]
    assert len(front) >= 3 and len({p["plan"] for p in pts}) == len(pts)
    for p in front:  # no candidate is both lighter and faster than a point on the front
        assert not any(q["peak_device_bytes"] < p["peak_device_bytes"] and q["time_factor"] < p["time_factor"]
                       for q in pts if not q.get("chosen"))  # fmt: skip
    assert min(p["peak_device_bytes"] for p in front) < 0.5 * plain[0]["peak_device_bytes"]
    assert Plan.from_dict(plan.to_dict()).frontier == pts  # it round-trips with the plan


def test_step_wide_settings_are_only_those_a_step_accepts():
    """fp16's loss scaling must see every gradient first: never offered with the step in backward."""
    from edgetrain.devices.store import get_device
    from edgetrain.planning.planner import step_wide_options

    labels = [g.label() for g in step_wide_options(get_device("jetson-nano"), 64)]
    assert any("precision:dtype=fp16" in x for x in labels) and any("step-in-backward" in x for x in labels)
    assert not [x for x in labels if "precision:dtype=fp16" in x and "step-in-backward" in x]
