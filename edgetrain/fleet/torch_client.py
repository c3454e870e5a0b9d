"""A fleet client with PyTorch: plans its local training for its own device, trains, reports.

Each client plans with edgetrain's planner for its own profile (a Nano and a GTX 750 get
different plans), held to plans that keep every layer's shape, so only weights cross the
network. The first local step of a round runs under the budget guard: the client reports its
measured peak against its budget. FedProx adds (mu/2)·||w - w_global||² to the loss.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetrain.core.step import make_optimizer, register_loss_term, train_step
from edgetrain.errors import ConfigError, EdgeOOMError
from edgetrain.export.onnx import trainable_names
from edgetrain.fleet.wire import STATS, FleetConfig, MismatchError, check_match, from_wire, shapes_of, to_wire
from edgetrain.memory.guard import BudgetGuard, allocation_granularity, tensor_budget
from edgetrain.models import create_model
from edgetrain.planning import Plan, apply_plan_, plan_for
from edgetrain.train.calibrate import resolve_profile
from edgetrain.train.evaluate import recalibrate_bn_

PROX = "fedprox"
_PLANS: dict[tuple, dict] = {}  # (model, device, batch, trainable, allow, size, optimizer) -> plan, once a process


def _proximal(model: nn.Module) -> torch.Tensor:
    """||w - w_global||² over the exchanged parameters (the anchor is set each round)."""
    anchor: dict[str, torch.Tensor] = model._fleet_anchor  # type: ignore[assignment]
    params = dict(model.named_parameters())
    return sum(((params[k] - a) ** 2).sum() for k, a in anchor.items() if k in params)  # type: ignore[return-value]


register_loss_term(PROX, _proximal)


def build_model(cfg: FleetConfig, init: str | None = None) -> nn.Module:
    """The federation's model, the same on every client and the server: seeded, or loaded from
    `init` (a board's own copy of the file) or `cfg.init`; the parameters outside --trainable frozen."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.num_classes)
    if init or cfg.init:
        try:
            model.load_state_dict(_weights(Path(init or cfg.init)))
        except RuntimeError as e:  # torch lists every key; the first difference says enough
            first = (str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)).split(", ")[0].rstrip(".")
            raise MismatchError(
                f"--init {init or cfg.init} does not match the server's model {cfg.model} ({first}): "
                "give every client the server's --init"
            ) from None
    keep = set(trainable_names(model, cfg.trainable or None))
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return model


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A fit run directory's checkpoint weights (what `edgetrain export --run` exports, so torch and
    onnxruntime clients start alike), or a state-dict file (a run's model.pt)."""
    from edgetrain.train import checkpoint as ckpt

    if path.is_dir():
        return ckpt.load(path / "checkpoint.pt")["model"]
    if not path.is_file():
        raise ConfigError(f"--init {path}: no such run directory or weights file")
    return torch.load(path, map_location="cpu", weights_only=True)


def exchanged(model: nn.Module) -> list[str]:
    """What crosses the network: trainable parameters, and the running statistics of every
    BatchNorm whose scale trains (a frozen BatchNorm keeps its statistics, as on the board)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad:
            names += [f"{prefix}.running_mean", f"{prefix}.running_var"]
    return names


def get_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The exchanged tensors as they go on the wire (`wire.to_wire`)."""
    state = model.state_dict()
    return to_wire({k: state[k].detach().cpu().numpy().copy() for k in exchanged(model)})


def set_arrays(model: nn.Module, arrays: dict[str, np.ndarray], who: str) -> None:
    """Load wire arrays; a name or shape that is not this model's is one line (`MismatchError`)."""
    check_match(shapes_of(get_arrays(model)), shapes_of(arrays), who)
    state = model.state_dict()
    with torch.no_grad():
        for k, v in from_wire(arrays).items():
            state[k].copy_(torch.from_numpy(v))


def train_mode_(model: nn.Module) -> None:
    """Train mode, but a BatchNorm whose scale is frozen keeps its running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


class TorchClient:
    """One client: its device, its data (x, y train; x, y test), and the plan for that device."""

    def __init__(self, cfg: FleetConfig, device: str, data: tuple[np.ndarray, ...], name: str = "client",
                 plan: dict | None = None, init: str | None = None):  # fmt: skip
        """`plan`: this client's plan from an earlier round (kept in its Flower context), not made again."""
        self.cfg, self.name = cfg, name
        self.profile = resolve_profile(device)
        self.xtr, self.ytr, self.xte, self.yte = (torch.from_numpy(a) for a in data)
        self.model = build_model(cfg, init)
        self.plan = Plan.from_dict(plan) if plan else self._plan()
        self.settings = apply_plan_(self.model, self.plan)

    def _plan(self) -> Plan:
        cfg = self.cfg
        key = (cfg.model, self.profile.name, cfg.batch_size, cfg.trainable, cfg.allow, cfg.input_size, cfg.optimizer)
        if key not in _PLANS:
            plan = plan_for(self.model, (3, cfg.input_size, cfg.input_size), cfg.batch_size, self.profile,
                            cfg.optimizer, name=cfg.model, num_classes=cfg.num_classes, allow=cfg.allow)  # fmt: skip
            _PLANS[key] = plan.to_dict()
        return Plan.from_dict(_PLANS[key])

    def fit(self, arrays: dict[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Local epochs from the global weights; returns the new weights and the round's figures."""
        cfg = self.cfg
        set_arrays(self.model, arrays, self.name)
        settings = self.settings
        if cfg.strategy == "fedprox" and cfg.proximal_mu > 0:
            self.model._fleet_anchor = {k: torch.from_numpy(v).clone() for k, v in arrays.items()}  # type: ignore[assignment]
            settings = dataclasses.replace(settings, orth=PROX, orth_weight=cfg.proximal_mu / 2)
        opt = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        scaler = torch.amp.GradScaler("cpu") if settings.precision == "fp16" else None
        train_mode_(self.model)
        g = torch.Generator().manual_seed(seed)
        losses, peak, t0 = [], None, time.perf_counter()
        for _ in range(cfg.local_epochs):
            order = torch.randperm(len(self.ytr), generator=g)
            for i in range(0, len(order) - 1, cfg.batch_size):  # a last batch of one would break BatchNorm
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:
                    continue
                if peak is None:
                    peak = self._guarded_step(self.xtr[idx], self.ytr[idx], opt, settings, scaler, losses)
                else:
                    losses.append(
                        float(train_step(self.model, self.xtr[idx], self.ytr[idx], opt, settings, scaler=scaler))
                    )
        metrics = {"num-examples": len(self.ytr), "loss": float(np.mean(losses)) if losses else 0.0,
                   "peak-bytes": int(peak or 0), "budget-bytes": int(tensor_budget(self.profile)),
                   "seconds": time.perf_counter() - t0}  # fmt: skip
        return get_arrays(self.model), metrics

    def _guarded_step(self, x, y, opt, settings, scaler, losses: list[float]) -> int:
        budget = tensor_budget(self.profile)
        try:
            with BudgetGuard(budget, self.model, opt, (x, y), allocation_granularity(self.profile)) as g:
                losses.append(float(train_step(self.model, x, y, opt, settings, g, scaler)))
        except EdgeOOMError as e:
            raise EdgeOOMError(f"{self.name} on {self.profile.name}: {e} under plan {self.plan.summary()}") from None
        return g.report().peak_bytes

    def evaluate(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The global weights on this client's test data, and the BatchNorm statistics of those
        weights on its training data (precise BN, `recalibrate_bn_`), on the wire: the server
        pools them into the statistics of the global weights on all clients' data."""
        set_arrays(self.model, arrays, self.name)
        stats = {}
        if any(k.endswith(STATS) for k in arrays):
            state = self.model.state_dict()
            frozen = {k: v.clone() for k, v in state.items() if k.endswith(STATS) and k not in arrays}
            recalibrate_bn_(self.model, self.xtr, self.cfg.batch_size)
            self.model.load_state_dict(frozen, strict=False)  # a frozen BatchNorm keeps its statistics
            stats = {k: v for k, v in get_arrays(self.model).items() if k.endswith(STATS)}
        loss, acc = evaluate_arrays(self.model, self.xte, self.yte)
        return {"num-examples": len(self.yte), "num-train": len(self.ytr), "loss": loss, "accuracy": acc}, stats


@torch.no_grad()
def evaluate_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return loss / max(1, len(y)), correct / max(1, len(y))


def central_evaluator(model: nn.Module, cfg: FleetConfig, data: str):
    """`evaluate(arrays) -> (loss, accuracy)` of the global weights on the test split of `data`."""
    from edgetrain.fleet.data import client_data

    _, _, xte, yte = client_data(cfg, {"data": data})
    x, y = torch.from_numpy(xte), torch.from_numpy(yte)

    def evaluate(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        set_arrays(model, arrays, "server")
        return evaluate_arrays(model, x, y)

    return evaluate
