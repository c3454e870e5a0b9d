"""The planner reads methods through the handler protocol only: a method registered in this file
alone is weighed, and chosen when it is the cheapest way to fit; no method is named in planning/."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgetrain.errors import BudgetError
from edgetrain.methods import base
from edgetrain.methods.base import MethodConfig, MethodHandler, UnitCost, list_methods, register_method, swap_class_
from edgetrain.models import create_model
from edgetrain.planning import plan_for
from edgetrain.planning.estimate import estimate

MiB = 2**20


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """A test method: recompute a residual block in backward, priced at `price` seconds a block."""

    name: ClassVar[str] = "toy-recompute"
    risk: ClassVar[int] = 0
    help: ClassVar[str] = "test only: recompute a block"


class _Toy:
    method = "toy-recompute"  # what set_exportable reports when it undoes the swap

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return checkpoint(super().forward, x, use_reentrant=False)


class ToyHandler(MethodHandler):
    config_type = ToyConfig
    plan_scope = "unit"
    price = 0.0  # seconds a block: free, so cheaper than any other way to save the block
    unseen = 0

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        return type(module).__name__ == "BasicBlock"

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        return swap_class_(module, _Toy)

    kind = "block"  # the unit kind it offers its one config for

    def unit_kind(self, name: str, module: nn.Module) -> str | None:
        return self.kind if self.eligible(name, module, self.config_type()) else None

    def candidates(self, kind: str) -> list[MethodConfig]:
        return [self.config_type()] if kind == self.kind else []

    def seconds(self, config: MethodConfig, unit: UnitCost) -> float:
        return self.price

    def unseen_bytes(self, model: nn.Module, config: MethodConfig) -> int:
        return self.unseen


def _register(monkeypatch, handler: MethodHandler) -> MethodHandler:
    """Register `handler` for one test; the registry is put back afterwards."""
    list_methods()  # the built-in methods first, as in any process
    monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))
    monkeypatch.setattr(base, "_BY_TYPE", dict(base._BY_TYPE))
    return register_method(handler)


@pytest.fixture
def toy(monkeypatch):
    return _register(monkeypatch, ToyHandler())


def _plan(budget_mib: int, allow: str = "lossy"):
    model = create_model("cifar_resnet20")
    return plan_for(model, (3, 32, 32), 64, "gtx750-1gb", name="cifar_resnet20", budget_bytes=budget_mib * MiB,
                    allow=allow)  # fmt: skip


def _budget() -> int:
    plain = estimate(create_model("cifar_resnet20"), (3, 32, 32), 64, device="gtx750-1gb")
    return int(plain.predicted.peak_device_bytes * 0.75 / MiB)


def test_the_planner_picks_a_method_registered_in_a_test_when_it_is_cheapest(toy):
    budget = _budget()
    plan = _plan(budget)
    chosen = {c.name for c in plan.choices.layers.values()}
    assert "toy-recompute" in chosen, plan.summary()
    assert plan.predicted.peak_device_bytes <= budget * MiB
    assert plan.overhead < 1.01  # free recomputation: no modelled time for the blocks it took


def test_a_dear_toy_method_is_weighed_and_left(toy):
    toy.price = 10.0  # ten seconds a block: every other way to fit is cheaper
    plan = _plan(_budget())
    assert "toy-recompute" not in {c.name for c in plan.choices.layers.values()} and not plan.is_plain


def test_without_the_toy_the_same_budget_takes_another_method():
    plan = _plan(_budget())
    assert plan.choices.layers and "toy-recompute" not in {c.name for c in plan.choices.layers.values()}


def test_the_estimate_hook_adds_what_fake_tensors_cannot_see(toy):
    model = create_model("cifar_resnet20")
    seen = estimate(model, (3, 32, 32), 16, methods=["toy-recompute"])
    toy.unseen = 8 * MiB
    both = estimate(model, (3, 32, 32), 16, methods=["toy-recompute"])
    for key in ("peak_total_bytes", "peak_device_bytes", "peak_process_bytes"):
        assert getattr(both.predicted, key) - getattr(seen.predicted, key) == 8 * MiB
    assert both.predicted.peak_by_category["unseen"] == 8 * MiB


def test_the_export_hook_is_every_handlers_own(toy):
    """set_exportable undoes the toy's class swap (the base's mechanism) and asks every handler."""
    from edgetrain.methods.base import prepare, set_exportable

    model = prepare(create_model("cifar_resnet8"), ["toy-recompute", "compress:bits=4"])[0]
    off = set_exportable(model)
    assert {"toy-recompute", "compress"} <= set(off)
    assert not any(isinstance(m, _Toy) for m in model.modules())


def _strings(path: Path) -> list[str]:
    """The string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}  # fmt: skip
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]  # fmt: skip


def test_no_method_is_named_in_planning():
    names = list_methods()
    found = []
    for path in sorted((Path(base.__file__).parents[1] / "planning").glob("*.py")):
        for s in _strings(path):
            found += [
                f"{path.name}: {n!r} in {s!r}" for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", s)
            ]
    assert not found, found


def test_the_check_for_names_would_catch_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('"""doc names checkpoint"""\nOPTIONS = ("plain", "compress:bits=4")\n')
    strings = _strings(f)
    assert "compress:bits=4" in strings and not any("checkpoint" in s for s in strings)


@dataclass(frozen=True)
class SlimConfig(MethodConfig):
    """A test method that changes the weights, not the activations: a wide linear layer becomes a
    rank-8 pair (the planner must count its parameter, gradient and momentum bytes)."""

    name: ClassVar[str] = "toy-slim"
    risk: ClassVar[int] = 1
    structural: ClassVar[bool] = True
    help: ClassVar[str] = "test only: a rank-8 linear"


class SlimHandler(ToyHandler):
    config_type = SlimConfig
    kind = "layer"

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        return isinstance(module, nn.Linear) and module.in_features * module.out_features >= 2**20

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        return nn.Sequential(nn.Linear(module.in_features, 8, bias=False), nn.Linear(8, module.out_features))


@pytest.fixture
def slim(monkeypatch):
    return _register(monkeypatch, SlimHandler())


LIGHTEST = ["step-in-backward", "optim-state:dtype=int8"]  # the lightest levers at the default level


def _wide():
    torch.manual_seed(0)
    layers = [m for _ in range(6) for m in (nn.ReLU(), nn.Linear(1024, 1024))]
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1024), *layers, nn.ReLU(), nn.Linear(1024, 10))


def test_a_method_that_shrinks_weights_is_weighed_by_the_bytes_it_frees(slim):
    """Below what any lever on activations or gradients reaches, the planner slims just enough
    layers: each option's parameter, gradient and optimizer-state bytes are in the knapsack."""
    lightest = estimate(_wide(), (3, 16, 16), 8, device="gtx750-1gb", methods=LIGHTEST)
    budget = lightest.predicted.peak_device_bytes - 12 * MiB
    with pytest.raises(BudgetError, match=r"with --allow lossy: .*; fits with --allow architecture: .*toy-slim x\d, "
                       r"\d+ MiB predicted$"):  # fmt: skip
        plan_for(_wide(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=budget)  # it changes the layers: not by default
    plan = plan_for(_wide(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=budget, allow="architecture")
    slimmed = [n for n, c in plan.choices.layers.items() if c.name == "toy-slim"]
    assert 1 <= len(slimmed) < 7 and plan.predicted.peak_device_bytes <= budget, plan.summary()
    assert any("its weights, gradients and optimizer state" in r for r in plan.reasons)
    assert plan.choices.shapes[slimmed[0]]  # the layer's shapes are recorded for loading later


def test_without_the_slim_method_nothing_reaches_that_budget():
    lightest = estimate(_wide(), (3, 16, 16), 8, device="gtx750-1gb", methods=LIGHTEST)
    with pytest.raises(BudgetError):
        plan_for(_wide(), (3, 16, 16), 8, "gtx750-1gb", budget_bytes=lightest.predicted.peak_device_bytes - 12 * MiB)


@dataclass(frozen=True)
class StageConfig(MethodConfig):
    """A test method for runs of blocks: recompute every block of the run in backward."""

    name: ClassVar[str] = "toy-stage"
    risk: ClassVar[int] = 0
    help: ClassVar[str] = "test only: recompute a run of blocks"


class StageHandler(ToyHandler):
    config_type = StageConfig
    kind = "run"

    def eligible(self, name: str, module: nn.Module, config: MethodConfig) -> bool:
        kids = list(module.children())
        return isinstance(module, nn.Sequential) and bool(kids) and all(type(k).__name__ == "BasicBlock" for k in kids)

    def apply(self, module: nn.Module, config: MethodConfig) -> nn.Module:
        for block in module.children():
            swap_class_(block, _Toy)
        return module


@pytest.fixture
def stage(monkeypatch):
    return _register(monkeypatch, StageHandler())


def test_a_run_of_blocks_is_one_unit_with_its_own_options_or_its_blocks(stage):
    """A free option on the run is taken for the whole run, and then nothing inside it is chosen;
    a dear one is left, and the blocks inside the run get their own options instead."""
    from edgetrain.planning.units import find_units

    units = find_units(create_model("cifar_resnet20"))
    assert units[0].name == "layers" and units[0].kind == "run"
    inside = [u for u in units if u.name.startswith("layers.")]
    assert len(inside) == 9 and {u.parent for u in inside} == {"layers"}
    budget = _budget()
    plan = _plan(budget)
    assert [(n, c.name) for n, c in plan.choices.layers.items()] == [("layers", "toy-stage")], plan.summary()
    assert plan.predicted.peak_device_bytes <= budget * MiB
    stage.price = 10.0
    plan = _plan(budget, "exact")  # (lossy: micro-batches of 32 images may be cheaper than either)
    assert "layers" not in plan.choices.layers and any(n.startswith("layers.") for n in plan.choices.layers)
    assert plan.predicted.peak_device_bytes <= budget * MiB
