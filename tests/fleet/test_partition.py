"""Partitions: disjoint and complete for every scheme, as skewed as asked, the same on every client."""

from __future__ import annotations

import numpy as np
import pytest

from edgetrain.errors import ConfigError
from edgetrain.fleet.partition import label_counts, parse_scheme, partition

LABELS = np.random.default_rng(0).integers(0, 10, 1437)


@pytest.mark.parametrize("spec", ["iid", "label:2", "label:3", "dirichlet:0.3", "dirichlet:5"])
@pytest.mark.parametrize("clients", [1, 3, 8])
def test_every_sample_goes_to_exactly_one_client(spec, clients):
    parts = partition(LABELS, clients, spec, seed=1)
    assert len(parts) == clients and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)


def test_the_same_seed_gives_every_client_the_same_split():
    a, b = partition(LABELS, 8, "dirichlet:0.5", 3), partition(LABELS, 8, "dirichlet:0.5", 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = partition(LABELS, 8, "dirichlet:0.5", 4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _top_share(spec: str, k: int) -> float:
    """The share of a client's samples in its k largest classes, averaged over clients."""
    counts = label_counts(LABELS, partition(LABELS, 8, spec, 0), 10)
    top = np.sort(counts, axis=1)[:, ::-1][:, :k].sum(1)
    return float(np.mean(top / counts.sum(1)))


def test_label_partition_gives_each_client_about_k_classes():
    assert _top_share("label:2", 2) > 0.8  # a shard can straddle two classes: not exactly 2
    assert _top_share("iid", 2) < 0.35  # 10 balanced classes: about 0.2


def test_smaller_dirichlet_alpha_is_further_from_iid():
    assert _top_share("dirichlet:0.1", 2) > _top_share("dirichlet:1", 2) > _top_share("dirichlet:100", 2)


@pytest.mark.parametrize("spec", ["label:0", "label:1.5", "dirichlet:-1", "shards", "label:x"])
def test_a_bad_scheme_is_one_line(spec):
    with pytest.raises(ConfigError, match="--partition"):
        parse_scheme(spec)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(ConfigError, match="cannot split 5 samples among 8"):
        partition(LABELS[:5], 8)
