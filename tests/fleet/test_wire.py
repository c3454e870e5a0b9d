"""The config and the weights on the wire: validated, round-tripped, and BatchNorm statistics pooled."""

from __future__ import annotations

import numpy as np
import pytest

from edgetrain.errors import ConfigError
from edgetrain.fleet.wire import FleetConfig, MismatchError, check_match, fix_shapes, from_wire, pack, to_wire, unpack


def test_the_config_round_trips_through_a_flower_record():
    from flwr.app import ConfigRecord

    cfg = FleetConfig(model="cifar_resnet8", trainable="fc", rounds=3, strategy="fedprox", proximal_mu=0.1)
    record = ConfigRecord({**cfg.to_record(), "server-round": 2})
    assert FleetConfig.from_record(record) == cfg


@pytest.mark.parametrize("bad, match", [({"rounds": 0}, "--rounds"), ({"fraction": 1.5}, "--fraction"),
                                        ({"strategy": "fedsgd"}, "--strategy"), ({"partition": "x"}, "--partition"),
                                        ({"allow": "anything"}, "--allow")])  # fmt: skip
def test_bad_options_are_one_line(bad, match):
    with pytest.raises(ConfigError, match=match):
        FleetConfig(**bad)


def test_plans_that_change_shapes_are_held_back_for_everyone_and_said():
    cfg, note = fix_shapes(FleetConfig(allow="architecture"))
    assert cfg.allow == "lossy" and "layer shapes" in note
    assert fix_shapes(FleetConfig(allow="exact")) == (FleetConfig(allow="exact"), None)


def test_a_mismatch_names_the_first_difference():
    server = {"fc.weight": (10, 64), "fc.bias": (10,)}
    check_match(server, dict(server), "client 0")
    with pytest.raises(MismatchError, match=r"fc.weight is \[10, 32\] here but \[10, 64\] on the server"):
        check_match(server, {"fc.weight": (10, 32), "fc.bias": (10,)}, "client 0")
    with pytest.raises(MismatchError, match="the server trains 1 tensors this client does not"):
        check_match(server, {"fc.weight": (10, 64)}, "client 0")
    with pytest.raises(MismatchError, match="this client trains 1 tensors the server does not"):
        check_match(server, {**server, "layers.0.weight": (3,)}, "client 0")


def test_arrays_round_trip_through_an_array_record():
    named = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    back = unpack(pack(named))
    assert list(back) == list(named) and all(np.array_equal(back[k], named[k]) for k in named)


def test_averaged_wire_statistics_are_the_pooled_statistics_of_all_clients():
    """Two clients' per-channel mean and variance, averaged on the wire by sample count, give the
    mean and variance of their data put together, where averaging variances would not."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 4)), rng.normal(3, 2, (100, 4))  # (samples, channels), far apart
    stats = [{"bn.running_mean": x.mean(0), "bn.running_var": x.var(0)} for x in (a, b)]
    wire = [to_wire(s) for s in stats]
    avg = {k: (300 * wire[0][k] + 100 * wire[1][k]) / 400 for k in wire[0]}
    pooled = from_wire(avg)
    both = np.concatenate([a, b])
    np.testing.assert_allclose(pooled["bn.running_mean"], both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pooled["bn.running_var"], both.var(0), rtol=1e-12)
    naive = (300 * stats[0]["bn.running_var"] + 100 * stats[1]["bn.running_var"]) / 400
    assert np.all(naive < 0.8 * both.var(0))
    assert all(
        np.array_equal(from_wire(to_wire(s))[k], s[k]) or np.allclose(from_wire(to_wire(s))[k], s[k])
        for s in stats
        for k in s
    )
