"""The whole fleet on Flower's simulation engine (Ray): torch clients on different devices, each
under its own plan, and onnxruntime clients without torch, in one federation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetrain.cli.main import main
from edgetrain.fleet.torch_client import build_model
from edgetrain.fleet.wire import FleetConfig

CFG = FleetConfig(model="cifar_resnet8", rounds=2, min_clients=3, trainable="fc", batch_size=32, partition="iid",
                  local_epochs=1, lr=0.05, round_timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Artifacts exported from the fleet's own starting model, with the fleet's trainable set."""
    from edgetrain.export.onnx import export_artifacts

    out = tmp_path_factory.mktemp("art")
    export_artifacts(build_model(CFG), out, (3, 32, 32), [str(i) for i in range(10)], trainable="fc")
    return out


def test_a_mixed_fleet_of_torch_and_onnxruntime_clients_trains_together(artifacts, tmp_path, capsys):
    out = tmp_path / "fleet"
    code = main(["fleet", "simulate", "--model", "cifar_resnet8", "--clients", "3", "--min-clients", "3",
                 "--rounds", "2", "--trainable", "fc", "--partition", "iid", "--devices", "jetson-nano,gtx750-1gb",
                 "--ort-clients", "1", "--artifacts", str(artifacts), "--out", str(out), "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds"] == 2 and [h["round"] for h in report["history"]] == [0, 1, 2]
    clients = {c["name"]: c for c in report["history"][-1]["client_figures"]}
    assert {c["kind"] for c in clients.values()} == {"TorchClient", "OrtClient"}
    assert {clients["client 0"]["device"], clients["client 1"]["device"]} == {"jetson-nano", "gtx750-1gb"}
    assert clients["client 2"]["device"] == "onnxruntime"
    for c in clients.values():
        assert c["peak-bytes"] <= c["budget-bytes"] or c["kind"] == "OrtClient"
    assert report["bytes_per_round"] == (10 * 64 + 10) * 4  # fc only: what --trainable fc sends
    with np.load(out / "global.npz") as z:
        start = build_model(CFG).fc.weight.detach().numpy()
        assert list(z.files) == ["fc.weight", "fc.bias"] and not np.allclose(z["fc.weight"], start)
    assert report["history"][-1]["accuracy"] > report["history"][0]["accuracy"]
    assert (out / "accuracy.png").is_file() and json.loads((out / "state.json").read_text())["round"] == 2


@pytest.mark.slow  # ~31 s; the mismatch line itself: test_wire.py and test_server.py (fast)
def test_onnxruntime_artifacts_with_another_trainable_set_stop_the_fleet_with_one_line(artifacts, tmp_path, capsys):
    code = main(["fleet", "simulate", "--model", "cifar_resnet8", "--clients", "2", "--min-clients", "2",
                 "--rounds", "1", "--trainable", "layers.2,fc", "--partition", "iid", "--ort-clients", "1",
                 "--artifacts", str(artifacts), "--out", str(tmp_path / "f"), "--eval-data", ""])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("edgetrain fleet: error: client node ")
    assert "model or trainable set does not match the server's: the server trains" in err[-1]


BOARD = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # a board without PyTorch: any import of it fails
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from edgetrain.fleet import apps, guard, processes
from edgetrain.fleet.data import client_data
from edgetrain.fleet.ort_client import OrtClient
from edgetrain.fleet.wire import FleetConfig
cfg = FleetConfig.from_record({cfg!r})
client = OrtClient(cfg, {art!r}, client_data(cfg, {{"partition-id": 0, "num-partitions": 4}}), "board")
start = {{k: client.trainer.parameter(k).copy() for k in ("fc.weight", "fc.bias")}}
got, metrics = client.fit(start, seed=0)
assert not np.allclose(got["fc.weight"], start["fc.weight"]) and metrics["num-examples"] > 300
print("trained without torch", any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules))
"""


def test_a_board_without_torch_trains_its_part_of_the_fleet(artifacts):
    import subprocess
    import sys

    code = BOARD.format(cfg=CFG.to_record(), art=str(artifacts))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "trained without torch False"
