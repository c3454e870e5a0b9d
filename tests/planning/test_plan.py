"""Plan files: round trip, and refusal when a plan does not match the model."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from edgetrain.errors import ConfigError
from edgetrain.methods.base import parse_spec, spec_of
from edgetrain.models import create_model
from edgetrain.planning import Choices, Plan, PlanRequest, apply_plan_
from edgetrain.planning.record import param_shapes


def _plan() -> Plan:
    m = create_model("cifar_resnet20")
    layers = {"layers.0": "checkpoint", "layers.1": "compress:bits=4", "fc": "compress:bits=8"}
    shapes = {n: param_shapes(m.get_submodule(n)) for n in layers}
    return Plan(PlanRequest("cifar_resnet20"), Choices(["microbatch:micro_batches=2"], layers, shapes))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    p = _plan()
    back = Plan.load(p.save(tmp_path / f"plan{suffix}"))
    assert back == p and back.summary() == p.summary()


def test_apply_plan_changes_the_named_layers_only():
    model = create_model("cifar_resnet20")
    settings = apply_plan_(model, _plan())
    assert settings.micro_batches == 2
    assert type(model.layers[0]).__name__.startswith("Checkpointed")
    assert type(model.layers[1].conv1).__name__.startswith("Compressed")
    assert type(model.layers[2]).__name__ == "BasicBlock"  # untouched
    assert list(model.state_dict()) == list(create_model("cifar_resnet20").state_dict())
    model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_a_plan_for_another_model_is_refused():
    with pytest.raises(ConfigError, match="names layer 'layers.0'.*make the plan for this model"):
        apply_plan_(create_model("resnet18"), _plan())
    other = copy.deepcopy(_plan())
    other.choices.shapes["fc"] = [[7, 64], [7]]
    with pytest.raises(ConfigError, match="layer 'fc' has parameter shapes"):
        apply_plan_(create_model("cifar_resnet20"), other)


def test_bad_plan_files_are_one_clear_error(tmp_path):
    cases = {
        "version: 1\nmethods: [checkpoint]\n": "plan version 1, this edgetrain reads versions 2 and 3",
        "version: 2\nlayers: {fc: compres}\n": "unknown method 'compres'",
        "version: 3\nchoices: {layers: {fc: compres}}\n": "unknown method 'compres'",
        "version: 3\nchoices: {methods: [compress:bits=3]}\n": "bits must be 1, 2, 4 or 8",
        "version: 2\nwhatever: 1\n": "unknown field",
        "version: 3\nrequest: {model: m, colour: red}\n": "malformed",
        "[1, 2": "not valid YAML",
    }
    for text, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            Plan.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        Plan.load(tmp_path / "missing.yaml")


def test_a_version_2_plan_file_is_converted(tmp_path):
    """The flat layout of version 2: the same request and choices, specs parsed into configs."""
    p = _plan()
    flat = {"version": 2, "model": "cifar_resnet20", "input_shape": [3, 32, 32], "batch_size": 32,
            "methods": ["microbatch:micro_batches=2"], "layers": {n: spec_of(c) for n, c in p.choices.layers.items()},
            "shapes": p.choices.shapes, "predicted": {}, "overhead": 1.0, "risk": 0, "reasons": [], "candidates": []}  # fmt: skip
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(flat))
    back = Plan.load(tmp_path / "old.yaml")
    assert back.choices == p.choices and back.request == p.request and back.version == 3
    assert back.to_dict()["choices"]["layers"]["layers.1"] == "compress:bits=4"


def test_choices_hold_configs_parsed_once():
    c = Choices(["microbatch:micro_batches=2"], {"fc": "compress:bits=8"})
    assert c.layers["fc"] == parse_spec("compress:bits=8") and c.methods[0].micro_batches == 2
    assert c.summary() == "microbatch:micro_batches=2 + compress:bits=8 x1"


def test_levers_say_what_each_method_changes_and_risks():
    c = Choices(
        ["precision:dtype=bf16"], {"layers.0": "checkpoint", "layers.1": "checkpoint", "fc": "tucker2:ratio=0.1"}
    )
    levers = {lv["method"]: lv for lv in c.levers()}
    assert levers["precision:dtype=bf16"] == {"method": "precision:dtype=bf16", "level": "lossy", "risk": 1,
                                              "where": "step"}  # fmt: skip
    assert levers["checkpoint"]["level"] == "exact" and levers["checkpoint"]["where"] == ["layers.0", "layers.1"]
    assert levers["tucker2:ratio=0.1"]["level"] == "architecture" and levers["tucker2:ratio=0.1"]["risk"] == 7
