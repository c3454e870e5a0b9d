"""The planner's model of a plan's peak (`Planner.modelled_peak`) against the exact fake step, on
a VGG-like model whose classifier holds the largest parameter: never under, and close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSpec
from edgetrain.devices.store import get_device
from edgetrain.methods.base import as_config
from edgetrain.planning.planner import Planner
from edgetrain.planning.record import Choices, PlanRequest
from edgetrain.planning.search import estimate_plan


class _TinyVGG(nn.Module):
    """A stage of plain layers (checkpointed whole, it recomputes them all) and a classifier whose
    first linear is the largest parameter (its gradient and the optimizer's temporaries)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x):  # (N, 3, 32, 32) -> (N, 10)
        return self.classifier(self.features(x))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_modelled_peak_is_never_under_the_exact_step(optimizer):
    """Micro-batches (a new gradient beside the accumulated one), packed optimizer state (its step's
    float32 temporaries), and a checkpointed stage (recomputed whole in its backward): each moves
    the peak to where the linear model of saved bytes alone is under the exact step."""
    model, profile = _TinyVGG(), get_device("cpu")
    request = PlanRequest("tiny", (3, 32, 32), 64, optimizer, profile.name, 2**30, "speed", "lossy", 1)
    plain = estimate_plan(model, Choices(), request, profile, 10)
    planner = Planner(model, StepSpec((3, 32, 32), 64, 10, optimizer), profile, "speed", plain, "lossy")
    checked = 0
    for g in planner.settings():
        names = {c.name for c in g.configs}
        micro = next((c.micro_batches for c in g.configs if c.name == "microbatch"), 1)
        if names & {"precision", "step-in-backward"} or micro not in (1, 4):
            continue
        for stage in (None, as_config("checkpoint")):
            chosen = {u.name: stage if u.name == "features" else None for u in planner.top}
            exact = estimate_plan(model, planner.to_choices(g, chosen), request, profile, 10).predicted.peak_total_bytes
            modelled = planner.modelled_peak(g, chosen)
            assert exact * 0.995 <= modelled <= exact * 1.3, (g.label(), stage, modelled, exact)
            checked += 1
    assert checked == 12  # optimizer state fp32/bf16/int8 x micro-batches 1/4 x stage plain/checkpointed


@pytest.mark.parametrize("ratio", [0.0625, 0.25])
def test_weights_made_low_rank_count_at_every_point_of_the_step(ratio):
    """A checkpointed stage's recompute is a peak of its own; the classifier made U·V holds fewer
    weights there too, though it comes after the stage (counted from its unit on, the model said
    90 MiB for an exact 36 at 1/16)."""
    model, profile = _TinyVGG(), get_device("cpu")
    request = PlanRequest("tiny", (3, 32, 32), 64, "sgd", profile.name, 2**30, "speed", "architecture", 1)
    plain = estimate_plan(model, Choices(), request, profile, 10)
    planner = Planner(model, StepSpec((3, 32, 32), 64, 10, "sgd"), profile, "speed", plain, "architecture")
    g = next(g for g in planner.settings() if not g.configs)
    picked = {"features": as_config("checkpoint"), "classifier.1": as_config(f"tucker2:ratio={ratio}")}
    chosen = {u.name: picked.get(u.name) for u in planner.top}
    exact = estimate_plan(model, planner.to_choices(g, chosen), request, profile, 10).predicted.peak_total_bytes
    assert exact * 0.995 <= planner.modelled_peak(g, chosen) <= exact * 1.3


def test_a_higher_level_measures_only_the_options_the_lower_lacks(monkeypatch):
    """`Planner.at` (the one-line answer's search one level up) keeps what the lower level measured:
    its table equals one measured anew, and only the added (low-rank) options run a fake pass."""
    from edgetrain.planning import units

    model, profile = _TinyVGG(), get_device("gtx750-1gb")
    request = PlanRequest("tiny", (3, 32, 32), 64, "sgd", profile.name, 2**30, "speed", "lossy", 1)
    plain = estimate_plan(model, Choices(), request, profile, 10)
    spec = StepSpec((3, 32, 32), 64, 10, "sgd")
    lossy = Planner(model, spec, profile, "speed", plain, "lossy")
    passes = []
    real = units._measure_option
    monkeypatch.setattr(units, "_measure_option", lambda *a: passes.append(a[3]) or real(*a))
    up = lossy.at("architecture")
    up_passes, passes[:] = list(passes), []
    fresh = Planner(model, spec, profile, "speed", plain, "architecture")
    added = {o for u in up.table.units for o in u.options} - {o for u in lossy.table.units for o in u.options}
    assert added and all(o.structural for o in added)
    assert up_passes and set(up_passes) <= added and len(passes) > len(up_passes) and None in passes
    assert up.table.acts == fresh.table.acts and up.table.flops == fresh.table.flops
    for a, b in zip(up.table.units, fresh.table.units, strict=True):
        assert (a.name, a.options, a.saved, a.fixed, a.flops) == (b.name, b.options, b.saved, b.fixed, b.flops)


def test_one_image_splits_come_after_every_change_of_the_layers():
    """At `--allow architecture` a lever that risks more than a change of the layers (one image a
    micro-batch under BatchNorm: -21 points on digits) is searched only when no change of the layers
    fits. On this net at 60 MiB, weighed by cost alone, the one-image split (x16 at b16) won."""
    from edgetrain.planning import plan_for
    from edgetrain.planning.search import _passes

    p = plan_for(
        _TinyVGG(), (3, 32, 32), 16, "gtx750-1gb", budget_bytes=60 * 2**20, allow="architecture", num_classes=10
    )
    splits = [c for c in p.choices.methods if c.name == "microbatch"]
    assert p.choices.layers and splits and all(c.images >= 2 for c in splits), p.summary()
    profile = get_device("gtx750-1gb")
    for model, has_bn in (
        (_TinyVGG(), True),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)), False),
    ):
        request = PlanRequest("m", (3, 32, 32), 16, "sgd", profile.name, 2**30, "speed", "architecture", 1)
        plain = estimate_plan(model, Choices(), request, profile, 10)
        planner = Planner(model, StepSpec((3, 32, 32), 16, 10), profile, "speed", plain, "architecture")
        passes = [("lossy", None), ("architecture", 7)] + ([("architecture", None)] if has_bn else [])
        assert _passes(planner, "architecture") == passes and _passes(planner, "lossy") == [("lossy", None)]
