"""The torch client: a round of local training is the plain loop, FedProx adds exactly its
proximal gradient, frozen parts stay frozen, each device gets its own plan, a mismatch is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetrain.core.step import make_optimizer, train_step
from edgetrain.fleet.torch_client import TorchClient, build_model, exchanged, get_arrays, set_arrays, train_mode_
from edgetrain.fleet.wire import FleetConfig, MismatchError


def _data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)  # (N, C, H, W)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y, x[:16], y[:16]


def _plain_round(cfg: FleetConfig, arrays: dict, data, seed: int, mu: float = 0.0) -> dict:
    """What a round must compute, written out: the same batches, optimizer and steps, with the
    proximal term (mu/2)·||w - w0||² added to the loss by hand."""
    model = build_model(cfg)
    set_arrays(model, arrays, "reference")
    anchor = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    train_mode_(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order) - 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if mu == 0:
                train_step(model, x[idx], y[idx], opt)
                continue
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = loss + mu / 2 * sum(((p - anchor[k]) ** 2).sum() for k, p in model.named_parameters() if k in anchor)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return get_arrays(model)


def test_a_round_is_the_plain_training_loop_bit_for_bit():
    cfg = FleetConfig(model="cifar_resnet8", input_size=16, batch_size=16, local_epochs=2, lr=0.05)
    client = TorchClient(cfg, "jetson-orin-nano", _data())
    assert client.plan.is_plain
    start = get_arrays(build_model(cfg))
    got, metrics = client.fit(start, seed=3)
    want = _plain_round(cfg, start, _data(), seed=3)
    assert list(got) == list(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not np.array_equal(got["fc.weight"], start["fc.weight"])
    assert metrics["num-examples"] == 48 and 0 < metrics["peak-bytes"] < metrics["budget-bytes"]


def test_fedprox_adds_exactly_the_proximal_gradient():
    cfg = FleetConfig(model="cifar_resnet8", input_size=16, batch_size=16, lr=0.05, strategy="fedprox", proximal_mu=0.5)
    start = get_arrays(build_model(cfg))
    start = {k: v + 0.01 * np.float32(np.sign(v + 1e-3)) if k.endswith("weight") else v for k, v in start.items()}
    got, _ = TorchClient(cfg, "jetson-orin-nano", _data()).fit(start, seed=1)
    want = _plain_round(cfg, start, _data(), seed=1, mu=0.5)
    plain = _plain_round(cfg, start, _data(), seed=1)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert max(np.abs(got[k] - plain[k]).max() for k in want) > 1e-4  # the term did something


def test_only_the_trainable_set_trains_and_crosses_the_wire():
    cfg = FleetConfig(model="cifar_resnet8", input_size=16, batch_size=16, trainable="fc")
    client = TorchClient(cfg, "jetson-orin-nano", _data())
    assert exchanged(client.model) == ["fc.weight", "fc.bias"]  # frozen BatchNorms send no statistics
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    got, _ = client.fit(get_arrays(client.model), seed=0)
    after = client.model.state_dict()
    assert list(got) == ["fc.weight", "fc.bias"]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_each_device_gets_its_own_plan_and_stays_under_its_budget():
    cfg = FleetConfig(model="cifar_resnet8", batch_size=1024)
    nano, gtx = (TorchClient(cfg, d, _data(64)) for d in ("jetson-nano", "gtx750-1gb"))
    assert nano.plan.is_plain and not gtx.plan.is_plain
    assert set(exchanged(nano.model)) == set(exchanged(gtx.model))  # plans keep every name and shape
    for client in (nano, gtx):
        _, metrics = client.fit(get_arrays(build_model(cfg)), seed=0)
        assert 0 < metrics["peak-bytes"] <= metrics["budget-bytes"]


def test_weights_of_another_model_are_one_line():
    cfg = FleetConfig(model="cifar_resnet8", input_size=16)
    other = get_arrays(build_model(FleetConfig(model="cifar_resnet20", input_size=16)))
    with pytest.raises(MismatchError, match="client 3: model or trainable set does not match the server's"):
        TorchClient(cfg, "cpu", _data(), name="client 3").fit(other, seed=0)


def test_evaluation_sends_the_statistics_of_the_global_weights_on_local_data():
    cfg = FleetConfig(model="cifar_resnet8", input_size=16, batch_size=16)
    client = TorchClient(cfg, "cpu", _data())
    start = get_arrays(build_model(cfg))
    metrics, stats = client.evaluate(start)
    assert metrics["num-train"] == 48 and 0 <= metrics["accuracy"] <= 1
    first = client.model.stem[0](torch.from_numpy(_data()[0]))  # (N, 16, 16, 16): what stem.1 normalizes
    np.testing.assert_allclose(stats["stem.1.running_mean"], first.mean((0, 2, 3)).detach().numpy(), atol=1e-5)
    assert set(stats) == {k for k in start if k.endswith(("running_mean", "running_var"))}
