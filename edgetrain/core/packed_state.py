"""Optimizer state kept packed between steps (`StepSettings.optimizer_state`).

A state codec (registered by a method: `register_state_codec`) packs each floating state tensor of
a parameter (momentum, Adam's moments) into fewer bytes. While a step runs, `optimizer.step()`
steps one parameter at a time: its state is unpacked to full precision for its own update and
packed again right after, so the full-precision state of one parameter is all that ever exists.
The optimizer's own update runs unchanged; only what is kept between steps is rounded.

Packed entries are named `key@codec.part` in the optimizer's state, so a checkpoint holds them
as they are, and a step without a codec (a plan that changed mid-run) unpacks them first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from edgetrain.errors import ConfigError


class StateCodec(Protocol):
    """Packs one state tensor into named parts (of the dtypes `dtypes` names), and back."""

    dtypes: dict[str, torch.dtype]

    def pack(self, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def unpack(self, key: str, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None: ...


STATE_CODECS: dict[str, StateCodec] = {}


def register_state_codec(name: str, codec: StateCodec) -> None:
    """Make `StepSettings(optimizer_state=name)` keep the optimizer state packed with `codec`."""
    STATE_CODECS[name] = codec


def codec_for(name: str) -> StateCodec:
    if name not in STATE_CODECS:
        known = ", ".join(["fp32", *STATE_CODECS]) or "fp32"
        raise ConfigError(f"optimizer state '{name}' unknown: use one of {known} (import edgetrain.methods)")
    return STATE_CODECS[name]


def pack_state(state: dict, name: str, param: torch.Tensor) -> None:
    """Pack every floating state tensor shaped like `param` (not Adam's scalar step), in place."""
    codec = codec_for(name)
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape:
            state.update({f"{key}@{name}.{part}": t for part, t in codec.pack(key, value).items()})
            del state[key]


def unpack_state(state: dict, param: torch.Tensor, scratch: dict | None = None) -> None:
    """Unpack every packed entry of `param`'s state to its shape and dtype, in place. `scratch`: one
    buffer per state key, reused from parameter to parameter (allocated once, for the largest)."""
    packed = [k for k in state if isinstance(k, str) and "@" in k]
    for key in dict.fromkeys(k.partition("@")[0] for k in packed):
        name = next(k for k in packed if k.startswith(key + "@")).partition("@")[2].partition(".")[0]
        prefix = f"{key}@{name}."
        parts = {k[len(prefix) :]: state.pop(k) for k in packed if k.startswith(prefix)}
        out = torch.empty_like(param) if scratch is None else _buffer(scratch, key, param)
        codec_for(name).unpack(key, parts, out)
        state[key] = out


def _buffer(scratch: dict, key: str, param: torch.Tensor) -> torch.Tensor:
    buf = scratch.get((key, param.dtype))
    if buf is None or buf.numel() < param.numel():
        buf = scratch[(key, param.dtype)] = torch.empty(scratch["numel"], dtype=param.dtype, device=param.device)
    return buf[: param.numel()].view(param.shape)


def is_packed(optimizer: torch.optim.Optimizer) -> bool:
    return any(isinstance(k, str) and "@" in k for s in optimizer.state.values() for k in s)


@contextlib.contextmanager
def packed_state(optimizer: torch.optim.Optimizer, name: str) -> Iterator[None]:
    """Within it, `optimizer.step()` keeps the state packed with codec `name` ("fp32": none; then
    state packed by an earlier plan is unpacked once, before anything steps)."""
    if name == "fp32":
        if is_packed(optimizer):
            _restore_dtypes(optimizer)
            for p, s in optimizer.state.items():
                unpack_state(s, p)
        yield
        return
    codec_for(name)
    _restore_dtypes(optimizer)
    step, kept = optimizer.step, optimizer.__dict__.get("step")  # an LR scheduler's counting wrapper, if any

    largest = max((p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad), default=0)
    scratch: dict = {"numel": largest}  # the unpacked state of the parameter being stepped, by key

    def step_each(*args, **kwargs) -> None:
        for p in [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]:
            with _only(optimizer, p):
                unpack_state(optimizer.state[p], p, scratch)
                step(*args, **kwargs)
                pack_state(optimizer.state[p], name, p)

    optimizer.step = step_each  # type: ignore[method-assign]  # what a GradScaler and the hooks call
    try:
        yield
    finally:
        if kept is None:
            del optimizer.step
        else:
            optimizer.step = kept  # type: ignore[method-assign]


def _restore_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """`load_state_dict` casts every state tensor to its parameter's dtype: packed parts go back
    to their own (the values are exact: integers, or what the codec stored)."""
    for s in optimizer.state.values():
        for k, v in s.items():
            if isinstance(k, str) and "@" in k:
                name, _, part = k.partition("@")[2].partition(".")
                want = codec_for(name).dtypes[part]
                if v.dtype != want:
                    s[k] = v.to(want)


@contextlib.contextmanager
def _only(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Iterator[None]:
    """The optimizer sees `p` alone (in its own group, with that group's settings)."""
    kept = [g["params"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["params"] = [p] if any(q is p for q in g["params"]) else []
    try:
        yield
    finally:
        for g, params in zip(optimizer.param_groups, kept, strict=True):
            g["params"] = params
