"""Split one labelled set among clients: IID, by label (each client holds a few classes), or by a
Dirichlet draw over labels. numpy only (no torch): the board's ClientApp uses it too.

Specs: `iid`, `label:K` (K classes a client; the shards of McMahan et al. 2017), `dirichlet:A`
(class shares drawn from Dir(A); small A is far from IID). The same spec and seed give every
client the same split, so each client can compute its own part without talking to the others.
"""

from __future__ import annotations

import numpy as np

from edgetrain.errors import ConfigError

SCHEMES = ("iid", "label", "dirichlet")


def parse_scheme(spec: str) -> tuple[str, float]:
    """'iid' -> ('iid', 0); 'label:2' -> ('label', 2); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    name, _, value = spec.partition(":")
    if name not in SCHEMES:
        raise ConfigError(f"--partition {spec!r}: use iid, label:K (classes per client) or dirichlet:A")
    if name == "iid":
        return name, 0.0
    try:
        v = float(value or {"label": 2, "dirichlet": 0.5}[name])
    except ValueError:
        raise ConfigError(f"--partition {spec!r}: {name} takes a number, e.g. {name}:2") from None
    if v <= 0 or (name == "label" and v != int(v)):
        raise ConfigError(f"--partition {spec!r}: {name} needs a positive {'whole ' if name == 'label' else ''}number")
    return name, v


def partition(labels: np.ndarray, num_parts: int, spec: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Indices into `labels` for each of `num_parts` clients: disjoint, covering every sample."""
    if num_parts < 1 or num_parts > len(labels):
        raise ConfigError(f"cannot split {len(labels)} samples among {num_parts} clients")
    name, value = parse_scheme(spec)
    rng = np.random.default_rng(seed)
    if name == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_parts)
    elif name == "label":
        parts = _shards(labels, num_parts, int(value), rng)
    else:
        parts = _dirichlet(labels, num_parts, value, rng)
    return [np.sort(p) for p in parts]


def _shards(labels: np.ndarray, num_parts: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into num_parts * per_client shards, give each client per_client shards."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_parts * per_client)
    picks = rng.permutation(len(shards)).reshape(num_parts, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in picks]


def _dirichlet(labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class is spread over the clients by shares drawn from Dir(alpha); redrawn until every
    client has at least one sample (bounded: 100 draws)."""
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_parts))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) > 0:
            return [np.asarray(p, np.int64) for p in parts]
    raise ConfigError(f"dirichlet:{alpha} leaves a client empty for {num_parts} clients: raise alpha or use fewer")


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) sample counts: what each client holds."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
