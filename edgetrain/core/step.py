"""One training step, the same code for real training, measurement and fake-tensor prediction.

The bottom layer of edgetrain: it imports nothing of edgetrain's but its errors. What a layer
above adds to a step comes in through `StepSettings`, a tracker (`StepTracker`: memory's
`MemoryTracker`), or a loss term registered by name (`register_loss_term`: the low-rank
methods' orthogonality regularizers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype

from edgetrain.core.packed_state import packed_state
from edgetrain.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_TERMS: dict[str, Callable[[nn.Module], torch.Tensor]] = {}  # name -> penalty(model), see StepSettings.orth


def register_loss_term(name: str, fn: Callable[[nn.Module], torch.Tensor]) -> None:
    """Make `StepSettings(orth=name)` add `orth_weight * fn(model)` to every step's loss."""
    LOSS_TERMS[name] = fn


class StepTracker(Protocol):
    """What `train_step` tells a memory tracker: phases, and what the live tensors are."""

    def in_phase(self, name: str) -> contextlib.AbstractContextManager: ...
    def label_live(self, category: str, phase: str) -> None: ...
    def track(self, tensors: Iterable[torch.Tensor | None], category: str) -> None: ...


@dataclass(frozen=True)
class StepSettings:
    """Global settings of a step: autocast precision, micro-batches per optimizer step, an
    orthogonality regularizer (`orth`, see methods/orthogonality.py) added to the loss, and
    `step_in_backward`: each parameter is updated as soon as its gradient is complete (during the
    last micro-batch's backward) and its gradient freed, so the gradients are never all held;
    `optimizer_state`: the codec the optimizer state is kept packed with between steps (see
    core/packed_state.py; "fp32": as the optimizer keeps it)."""

    precision: str = "fp32"
    micro_batches: int = 1
    orth: str = ""
    orth_weight: float = 0.0
    step_in_backward: bool = False
    optimizer_state: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' unknown: use one of {list(PRECISIONS)}")
        if self.micro_batches < 1:
            raise ConfigError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.step_in_backward and self.precision == "fp16":
            raise ConfigError(
                "the optimizer step in backward cannot run with fp16: loss scaling must see every gradient "
                "before any step; use bf16 or drop step-in-backward"
            )


@dataclass(frozen=True)
class StepSpec:
    """What one training step is: input shape (C, H, W), batch, classes, optimizer, settings."""

    input_shape: tuple[int, int, int]
    batch_size: int
    num_classes: int
    optimizer: str = "sgd"
    settings: StepSettings = StepSettings()


OPTIMIZERS = {"sgd": 1, "adamw": 2}  # the optimizers edgetrain knows -> state tensors per trainable parameter


def make_schedule(optimizer: torch.optim.Optimizer, lr: float, total_steps: int):
    """`fit`'s learning-rate schedule: one cycle over the run, 15 % warm-up to the peak `lr`."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.15)


def make_optimizer(name: str, params, lr: float = 0.05) -> torch.optim.Optimizer:
    """The optimizers edgetrain knows, with the defaults its memory figures assume. Weight decay
    applies to weight matrices and kernels only: decaying BatchNorm scales and biases pulls them
    towards zero for nothing (it hurts most on small datasets, where it is most of the signal)."""
    params = [p for p in params if p.requires_grad]
    decay, no_decay = [p for p in params if p.dim() > 1], [p for p in params if p.dim() <= 1]
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer '{name}' unknown: use sgd or adamw")
    wd = 5e-4 if name == "sgd" else 1e-2
    groups = [
        g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
    ]
    if name == "sgd":
        return torch.optim.SGD(groups or params, lr=lr, momentum=0.9, foreach=False)
    return torch.optim.AdamW(groups or params, lr=lr, foreach=False)


def _autocast(x: torch.Tensor, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def train_step(
    model: nn.Module,
    x: torch.Tensor,  # (N, C, H, W)
    y: torch.Tensor,  # (N,)
    optimizer: torch.optim.Optimizer,
    settings: StepSettings = StepSettings(),
    tracker: StepTracker | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward, backward (accumulated over micro-batches) and optimizer step; returns the loss.

    With a tracker, marks the phases and labels what is held at the end of each forward pass
    as saved activations, then gradients and optimizer state once they exist.
    """
    if scaler and settings.step_in_backward:
        raise ConfigError("the optimizer step in backward cannot run with a GradScaler (fp16): use bf16 or fp32")
    tr = tracker or _NullTracker()
    total = x.new_zeros(())
    n = max(1, min(settings.micro_batches, x.shape[0]))
    with packed_state(optimizer, settings.optimizer_state):
        for i, (xc, yc) in enumerate(zip(x.chunk(n), y.chunk(n), strict=True)):
            loss = forward_pass(model, xc, yc, settings, tr, xc.shape[0] / x.shape[0])
            last = settings.step_in_backward and i == n - 1
            with (
                tr.in_phase("backward"),
                _step_in_backward(model, optimizer, chunked=settings.optimizer_state == "fp32")
                if last
                else contextlib.nullcontext(),
            ):
                (scaler.scale(loss) if scaler else loss).backward()
            total = total + loss.detach()
        tr.track((p.grad for p in model.parameters()), "gradients")
        with tr.in_phase("optimizer"):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            elif not settings.step_in_backward:  # else every parameter was updated in backward
                optimizer.step()
    tr.track(optimizer_state_tensors(optimizer), "optimizer")
    optimizer.zero_grad(set_to_none=True)
    return total


def forward_pass(
    model: nn.Module,
    x: torch.Tensor,  # (n, C, H, W): a micro-batch
    y: torch.Tensor,  # (n,)
    settings: StepSettings = StepSettings(),
    tracker: StepTracker | None = None,
    share: float = 1.0,
) -> torch.Tensor:
    """The forward pass of a step on one micro-batch, its loss weighted by its `share` of the batch;
    with a tracker, what is held when it ends is labelled as saved activations."""
    tr = tracker or _NullTracker()
    with tr.in_phase("forward"), _autocast(x, settings.precision):
        loss = nn.functional.cross_entropy(model(x), y) * share
        if settings.orth:
            loss = loss + settings.orth_weight * share * _penalty(model, settings.orth)
    tr.label_live("activations", "forward")
    return loss


@contextlib.contextmanager
def _step_in_backward(model: nn.Module, optimizer: torch.optim.Optimizer, chunked: bool = True):
    """Update each trainable parameter as soon as its gradient is complete, then free the gradient.

    `optimizer.step()` updates only parameters that have a gradient, and each one's update reads
    only its own gradient and state, so stepping one at a time is the same update as one step at the
    end (SGD with momentum and weight decay, AdamW): exact. The autograd engine sums every use of a
    parameter before its accumulate hook runs, so shared weights are stepped once. `chunked`: large
    parameters of Adam/AdamW are stepped in pieces (`_step_in_chunks`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def hook(p: torch.Tensor) -> None:
        # after earlier micro-batches the others hold partial sums: hidden while `p` is stepped
        others = [(q, q.grad) for q in params if q is not p and q.grad is not None]
        for q, _ in others:
            q.grad = None
        group = group_of.get(id(p), {})  # {}: not the optimizer's
        if chunked and _chunkable(optimizer, group, p):
            _step_in_chunks(optimizer, group, p)
        else:
            with _in_place_weight_decay(optimizer, group, p):
                optimizer.step()
        p.grad = None
        for q, g in others:
            q.grad = g

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


CHUNK_NUMEL = 1 << 20  # Adam's update in backward works through a larger parameter this many elements at a time


def _chunkable(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> bool:
    plain_adam = isinstance(optimizer, torch.optim.Adam) and not any(
        group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable", "fused")
    )
    dense = p.grad is not None and p.is_contiguous() and p.grad.is_contiguous() and not p.grad.is_sparse
    return bool(group) and plain_adam and dense and p.numel() > CHUNK_NUMEL


def _step_in_chunks(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> None:
    """Adam's update makes temporaries as large as the parameter (its denominator), at the activation
    peak when stepping in backward: vgg11_bn's 400 MB classifier weight made the step-in-backward
    peak 18 % higher than plain. The parameter is stepped as views of `CHUNK_NUMEL` elements instead,
    each with its own copy of the step count, by the optimizer's own `step` (same arithmetic,
    elementwise), so the temporaries are a chunk's."""
    state = optimizer.state[p]
    if not state:  # as Adam's lazy initialisation makes it
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    flat = [t.detach().view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
    kept, step = group["params"], state["step"]
    try:
        for a in range(0, p.numel(), CHUNK_NUMEL):
            view, grad, m, v = (t[a : a + CHUNK_NUMEL] for t in flat)
            view.grad = grad
            optimizer.state[view] = {"step": step.clone(), "exp_avg": m, "exp_avg_sq": v}
            group["params"] = [view]
            optimizer.step()
            state["step"] = optimizer.state.pop(view)["step"]
    finally:
        group["params"] = kept


@contextlib.contextmanager
def _in_place_weight_decay(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor):
    """SGD adds weight decay into a copy of the gradient (`grad.add(param)`), a tensor as large as
    the parameter, made at the activation peak when stepping in backward: the same sum is done in
    place instead, and the group's decay is off for this step."""
    wd = group.get("weight_decay", 0.0)
    if not (isinstance(optimizer, torch.optim.SGD) and wd and p.grad is not None):
        yield
        return
    p.grad.add_(p, alpha=wd)
    group["weight_decay"] = 0.0
    try:
        yield
    finally:
        group["weight_decay"] = wd


def _penalty(model: nn.Module, kind: str) -> torch.Tensor:
    if kind not in LOSS_TERMS:
        raise ConfigError(
            f"loss term '{kind}' unknown: use one of {sorted(LOSS_TERMS)} (import edgetrain.methods.base)"
        )
    return LOSS_TERMS[kind](model)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer):
    """The tensors an optimizer keeps between steps (momentum, Adam moments)."""
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


class _NullTracker:
    def in_phase(self, name: str):
        return contextlib.nullcontext()

    def label_live(self, *a) -> None:
        pass

    def track(self, *a) -> None:
        pass
