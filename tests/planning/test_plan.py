"""Plan files: round trip, and refusal when a plan does not match the model."""

from __future__ import annotations

import copy

import pytest
import torch

from edgetrain.errors import ConfigError
from edgetrain.models import create_model
from edgetrain.planning import Plan, apply_plan_
from edgetrain.planning.record import param_shapes


def _plan() -> Plan:
    m = create_model("cifar_resnet20")
    layers = {"layers.0": "checkpoint", "layers.1": "compress:bits=4", "fc": "compress:bits=8"}
    return Plan(methods=["microbatch:micro_batches=2"], layers=layers, model="cifar_resnet20",
                shapes={n: param_shapes(m.get_submodule(n)) for n in layers})  # fmt: skip


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
    other.shapes["fc"] = [[7, 64], [7]]
    with pytest.raises(ConfigError, match="layer 'fc' has parameter shapes"):
        apply_plan_(create_model("cifar_resnet20"), other)


def test_bad_plan_files_are_one_clear_error(tmp_path):
    cases = {
        "version: 1\nmethods: [checkpoint]\n": "plan version 1, this edgetrain reads version 2",
        "version: 2\nlayers: {fc: compres}\n": "unknown method 'compres'",
        "version: 2\nwhatever: 1\n": "unknown field",
        "[1, 2": "not valid YAML",
    }
    for text, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            Plan.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        Plan.load(tmp_path / "missing.yaml")
