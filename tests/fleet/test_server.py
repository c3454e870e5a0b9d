"""The server's rounds on an in-process grid: FedAvg is the sample-weighted mean, a killed server
resumes bit for bit, a silent client is dropped, a short round is retried, and a client with
another model stops the run with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetrain.fleet.server import ROUND_TRIES, FleetError, FleetServer
from edgetrain.fleet.torch_client import build_model, central_evaluator, get_arrays
from edgetrain.fleet.wire import FleetConfig, MismatchError

from .conftest import LocalGrid, ServerKilled, digits_nodes, same_arrays

CFG = FleetConfig(model="cifar_resnet8", input_size=16, rounds=3, min_clients=2, batch_size=32, partition="iid",
                  round_timeout=5)  # fmt: skip


def _server(out, cfg=CFG, evaluate=True):
    model = build_model(cfg)
    return FleetServer(cfg, out, get_arrays(model), central_evaluator(model, cfg, "digits") if evaluate else None,
                       wait_s=2, log=lambda line: None)  # fmt: skip


def _saved(out):
    with np.load(out / "global.npz") as z:
        return {k: z[k] for k in z.files}


def test_fedavg_is_the_sample_weighted_mean_of_the_clients(grid_ids, tmp_path):
    """One round with the statistics pooling checked apart: the averaged parameters are
    sum(n_k w_k) / sum(n_k) of what each client sent."""
    from edgetrain.fleet import apps

    cfg = FleetConfig(**{**CFG.to_record(), "rounds": 1})
    grid = LocalGrid(digits_nodes(3))
    sent = []
    original = apps.handle_train

    def spy(msg, context, devices, nodes=None):
        reply = original(msg, context, devices, nodes)
        sent.append((int(reply.content["metrics"]["num-examples"]), apps.unpack(reply.content["arrays"])))
        return reply

    apps.handle_train = spy
    try:
        _server(tmp_path, cfg, evaluate=False).run(grid)
    finally:
        apps.handle_train = original
    got, total = _saved(tmp_path), sum(n for n, _ in sent)
    assert len(sent) == 3 and len({n for n, _ in sent}) > 1  # unequal shares: the weights matter
    for k in got:
        if not k.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(got[k], sum(n * a[k] for n, a in sent) / total, rtol=1e-5, atol=1e-7)


def test_a_killed_server_resumes_from_its_last_round_bit_for_bit(grid_ids, tmp_path):
    whole = tmp_path / "whole"
    report = _server(whole).run(LocalGrid(digits_nodes(3)))
    assert report["rounds"] == 3 and json.loads((whole / "state.json").read_text())["round"] == 3
    killed = tmp_path / "killed"
    with pytest.raises(ServerKilled):
        _server(killed).run(LocalGrid(digits_nodes(3), die_in_round=2))
    assert json.loads((killed / "state.json").read_text())["round"] == 1
    resumed = _server(killed).run(LocalGrid(digits_nodes(3)))
    assert resumed["rounds"] == 3 and [h["round"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert same_arrays(_saved(killed), _saved(whole))
    assert resumed["final_accuracy"] == report["final_accuracy"]
    assert (killed / "accuracy.png").is_file()


def test_a_client_that_does_not_reply_is_dropped_from_the_round(grid_ids, tmp_path):
    grid = LocalGrid(digits_nodes(3), drop=lambda node, attempt: node == 102)
    report = _server(tmp_path, evaluate=False).run(grid)
    assert [h["replied"] for h in report["history"]] == [2, 2, 2]
    assert all(h["clients"] == 3 for h in report["history"])


def test_a_round_with_too_few_replies_is_tried_again(grid_ids, tmp_path):
    cfg = FleetConfig(**{**CFG.to_record(), "rounds": 1, "min_clients": 3})
    grid = LocalGrid(digits_nodes(3), drop=lambda node, attempt: node == 102 and attempt <= 3)  # back in try 2
    report = _server(tmp_path, cfg, evaluate=False).run(grid)
    assert report["history"][-1]["replied"] == 3 and grid.train_calls[1] == 3 + 3


def test_a_round_that_never_gets_enough_replies_stops_with_one_line(grid_ids, tmp_path):
    cfg = FleetConfig(**{**CFG.to_record(), "rounds": 1, "min_clients": 3})
    grid = LocalGrid(digits_nodes(3), drop=lambda node, attempt: node == 102)
    with pytest.raises(FleetError, match=f"fewer than --min-clients 3 replied in {ROUND_TRIES} tries"):
        _server(tmp_path, cfg, evaluate=False).run(grid)


def test_too_few_connected_clients_is_one_line_after_a_bounded_wait(grid_ids, tmp_path):
    cfg = FleetConfig(**{**CFG.to_record(), "min_clients": 4})
    with pytest.raises(FleetError, match="only 3 clients connected within 2 s, fewer than --min-clients 4"):
        _server(tmp_path, cfg, evaluate=False).run(LocalGrid(digits_nodes(3)))


def test_a_client_with_another_model_stops_the_run_with_its_line(grid_ids, tmp_path):
    grid = LocalGrid(digits_nodes(2, {1: {"init": str(tmp_path / "other.pt")}}))
    import torch

    torch.save(build_model(FleetConfig(model="cifar_resnet20")).state_dict(), tmp_path / "other.pt")
    line = r"client node 101: --init .*other.pt does not match the server's model cifar_resnet8 \(Missing key"
    with pytest.raises(MismatchError, match=line):
        _server(tmp_path / "run", evaluate=False).run(grid)
