"""What crosses the network in a fleet: the run's config and the exchanged weights.

No torch here: a board that trains with onnxruntime alone reads the same records. Weights go as
a name -> array map (Flower's ArrayRecord), so a client checks names and shapes before it trains
and a mismatch is one line, not a shape error deep in a step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from edgetrain.errors import ConfigError
from edgetrain.fleet.partition import parse_scheme
from edgetrain.levels import CHANGE_LEVELS, check_allow

STRATEGIES = ("fedavg", "fedprox")
REASON = "edgetrain: "  # how a client's refusal starts in Flower's error reply: its one line follows
REFUSED = 100  # a refusal's Flower error code: REFUSED + the edgetrain error's exit code
FLEET_ALLOW = "lossy"  # plans that change layer shapes would differ per client: the weights could not be averaged


class MismatchError(ConfigError):
    """A client's model or trainable set is not the server's."""

    exit_code = 3


@dataclass(frozen=True)
class FleetConfig:
    """One federation: the model and what trains, the strategy, the rounds and each client's local
    training. Frozen and validated; crosses the network as a flat ConfigRecord."""

    model: str = "cifar_resnet20"
    num_classes: int = 10
    input_size: int = 32
    trainable: str = ""  # comma-separated parameter patterns ('layer3,fc'); empty: all parameters
    init: str = ""  # starting weights: a fit run directory (its checkpoint, as `export --run` reads) or a weights file
    rounds: int = 10
    fraction: float = 1.0  # share of the connected clients sampled each round
    min_clients: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx's mu (unused by FedAvg)
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    allow: str = FLEET_ALLOW  # the most each client's planner may change training
    data: str = "digits"  # each client's data when its node gives none: a partition of this set
    partition: str = "label:2"
    seed: int = 0
    round_timeout: float = 600.0  # seconds a round waits for replies

    def __post_init__(self) -> None:
        for key in ("num_classes", "input_size", "rounds", "min_clients", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r}: use {' or '.join(STRATEGIES)}")
        if not self.lr > 0 or self.proximal_mu < 0 or self.round_timeout <= 0:
            raise ConfigError("--lr and --round-timeout must be positive and --proximal-mu not negative")
        check_allow(self.allow)
        parse_scheme(self.partition)

    def to_record(self) -> dict[str, Any]:
        """Flat scalars, as a Flower ConfigRecord holds them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> FleetConfig:
        """From a ConfigRecord or run config; unknown keys (Flower's own, like server-round) are skipped."""
        kinds = {f.name: f.type for f in fields(cls)}
        got = {k: record[k] for k in kinds if k in record}
        for k in ("rounds", "min_clients", "local_epochs", "batch_size", "num_classes", "input_size", "seed"):
            if k in got:
                got[k] = int(got[k])
        for k in ("fraction", "proximal_mu", "lr", "round_timeout"):
            if k in got:
                got[k] = float(got[k])
        return cls(**got)


def fix_shapes(cfg: FleetConfig) -> tuple[FleetConfig, str | None]:
    """The config every client gets: plans held to --allow lossy, so no client changes a layer's
    shape (only weights are averaged), and the line that says so when that lowered --allow."""
    if CHANGE_LEVELS.index(cfg.allow) <= CHANGE_LEVELS.index(FLEET_ALLOW):
        return cfg, None
    note = (f"--allow {cfg.allow}: every client keeps the server's layer shapes (only weights are averaged), so "
            f"client plans go up to --allow {FLEET_ALLOW}; to change layers for everyone, convert the model first "
            "(edgetrain fit --allow architecture) and start the fleet from it")  # fmt: skip
    return dataclasses.replace(cfg, allow=FLEET_ALLOW), note


def shapes_of(named: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in named.items()}


def check_match(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], who: str) -> None:
    """The server's exchanged set (names -> shapes) against a client's own; one line on a mismatch."""
    if expected == got:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if shaped:
        k = shaped[0]
        what = f"{k} is {list(got[k])} here but {list(expected[k])} on the server"
    elif missing:
        what = f"the server trains {len(missing)} tensors this client does not ({missing[0]}, ...)"
    else:
        what = f"this client trains {len(extra)} tensors the server does not ({extra[0]}, ...)"
    raise MismatchError(
        f"{who}: model or trainable set does not match the server's: {what}; use the server's --model and "
        "--trainable (for onnxruntime clients: export with the same --trainable)"
    )


MEAN, VAR = ".running_mean", ".running_var"
STATS = (MEAN, VAR)  # BatchNorm statistics: on the wire, pooled, never trained


def to_wire(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A BatchNorm's running_var crosses the wire as its second moment E[x²] = var + mean²: the
    weighted average of second moments is the pooled one, so the receiver's var = E[x²] - mean²
    counts the spread between clients' means too. Averaging variances instead misses that
    spread; under label-skewed clients it left the global model at 25 % on digits where
    statistics recomputed on the data gave 74 % (bench/fleet.py)."""
    out = dict(named)
    for k in named:
        if k.endswith(VAR) and (m := k[: -len(VAR)] + MEAN) in named:
            out[k] = named[k] + named[m] ** 2
    return out


def from_wire(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `to_wire` (clamped at zero against rounding)."""
    out = dict(named)
    for k in named:
        if k.endswith(VAR) and (m := k[: -len(VAR)] + MEAN) in named:
            out[k] = np.maximum(named[k] - named[m] ** 2, 0).astype(named[k].dtype)
    return out


def pack(named: dict[str, np.ndarray]):
    """name -> array as a Flower ArrayRecord (order kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


def unpack(record) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def nbytes(named: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in named.values()))
