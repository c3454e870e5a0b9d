"""Optimizer state kept in bf16 or 8 bits between steps: momentum and Adam's moments take a half or
about a quarter of their bytes (a lossy lever: the update itself runs in full precision).

- `bf16`: each state tensor rounded to bfloat16 (stored as int16, so a checkpoint keeps it so).
- `int8`: blocks of 256 values share one fp32 scale (their largest magnitude). Momentum and
  Adam's first moment are rounded to the nearest of 255 levels. Adam's second moment stays in
  bf16: with one linear scale per block its small entries would round to zero or far up, and an
  update divides by them.

The per-parameter unpack/step/pack is the core step's (core/packed_state.py); this file gives the
codecs and makes the lever one the planner can weigh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from edgetrain.core.packed_state import register_state_codec
from edgetrain.core.step import StepSettings
from edgetrain.devices.profile import DeviceProfile
from edgetrain.methods.base import MethodConfig, MethodHandler, StepEffect, register_method

BLOCK = 256  # values per int8 scale
# packed bytes over fp32 bytes, at most (int8: SGD's momentum takes 0.254; AdamW's two moments 0.377)
SCALE = {"bf16": 0.5, "int8": ((1 + 4 / BLOCK) / 4 + 0.5) / 2}
# the step unpacks a parameter's state to float32 beside its update: largest parameters per state slot held on
# top at the step's peak (fake steps of vgg11_bn, resnet18, mobilenet_v2 with SGD and AdamW: 1.5 / 1.5; 1.75 / 1.625)
STEP_TEMPS = {"bf16": 1.5, "int8": 1.625}
TIME = {"bf16": 1.02, "int8": 1.04}  # a few passes over the state per step: little beside the model's


class Bf16State:
    dtypes = {"v": torch.int16}

    def pack(self, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": value.to(torch.bfloat16).view(torch.int16)}

    def unpack(self, key: str, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        out.view(-1).copy_(parts["v"].view(torch.bfloat16).view(-1))


BF16 = Bf16State()


class Int8State:
    """Signed state in int8 with a scale per block; second moments (`*_sq`) in bf16 (see above).
    Packed and unpacked a chunk at a time: the temporaries stay a few MiB whatever the layer."""

    chunk = 1024  # blocks of BLOCK values per pass: 1 MiB of float32 temporaries
    dtypes = {"q": torch.int8, "s": torch.float32, "v": torch.int16}

    def pack(self, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if key.endswith("_sq"):
            return BF16.pack(key, value)
        flat = value.detach().flatten()
        q = torch.empty(-(-flat.numel() // BLOCK) * BLOCK, dtype=torch.int8, device=value.device)
        scale = torch.empty(q.numel() // BLOCK, 1, dtype=torch.float32, device=value.device)  # (B, 1)
        for i in _passes(scale.shape[0], self.chunk, value):
            part = flat[i * BLOCK : (i + self.chunk) * BLOCK].to(torch.float32, copy=True)  # never the state
            part = F.pad(part, (0, -part.numel() % BLOCK)) if part.numel() % BLOCK else part
            part = part.view(-1, BLOCK)  # (b, 256)
            s = scale[i : i + part.shape[0]]
            torch.amax(part.abs(), dim=1, keepdim=True, out=s).clamp_(min=1e-30)
            q[i * BLOCK : i * BLOCK + part.numel()] = part.div_(s).mul_(127).round_().flatten()
            del part  # freed before the next pass makes its own: every pass holds the same
        return {"q": q, "s": scale}

    def unpack(self, key: str, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        if key.endswith("_sq"):
            return BF16.unpack(key, parts, out)
        q, scale, flat = parts["q"].view(-1, BLOCK), parts["s"], out.view(-1)
        for i in _passes(q.shape[0], self.chunk, out):
            part = flat[i * BLOCK : (i + self.chunk) * BLOCK]
            codes = q[i : i + self.chunk].flatten()[: part.numel()]
            steps = (scale[i : i + self.chunk] / 127).expand(-1, BLOCK).flatten()[: part.numel()]
            torch.mul(codes, steps, out=part)
            del steps  # freed before the next pass makes its own: every pass holds the same


def _passes(blocks: int, chunk: int, t: torch.Tensor) -> range:
    """The chunks' first blocks. Under fake tensors (estimating) one pass stands for all: every
    pass makes and frees temporaries of the same sizes, so the peak is the same, at 1/passes the ops."""
    return range(0, min(blocks, chunk) if is_fake(t) else blocks, chunk)


register_state_codec("bf16", BF16)
register_state_codec("int8", Int8State())


@dataclass(frozen=True)
class OptimStateConfig(MethodConfig):
    """Keep the optimizer's state (momentum, Adam's moments) packed between steps."""

    name: ClassVar[str] = "optim-state"
    help: ClassVar[str] = "optimizer state (momentum, Adam's moments) kept in bf16 or 8 bits between steps"
    spec_keys: ClassVar[tuple[str, ...]] = ("dtype",)
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in SCALE:
            raise ValueError(f"dtype must be one of {', '.join(SCALE)}, got {self.dtype!r}")

    @property
    def risk(self) -> int:  # type: ignore[override]
        return 1 if self.dtype == "bf16" else 3


class OptimStateHandler(MethodHandler):
    config_type = OptimStateConfig
    plan_scope = "step"

    def step_candidates(self, profile: DeviceProfile, batch_size: int) -> list[MethodConfig]:
        return [OptimStateConfig(d) for d in SCALE]

    def step_effect(
        self, config: MethodConfig, profile: DeviceProfile, has_batchnorm: bool, batch_size: int
    ) -> StepEffect:
        assert isinstance(config, OptimStateConfig)
        return StepEffect(
            state_scale=SCALE[config.dtype],
            time_factor=TIME[config.dtype],
            risk=config.risk,
            step_temps=STEP_TEMPS[config.dtype],
            reason=f"optim-state:dtype={config.dtype}: the optimizer state is kept at "
            f"{SCALE[config.dtype]:.2f}x its bytes between steps",
        )

    def step_settings(self, settings: StepSettings, config: MethodConfig) -> StepSettings:
        assert isinstance(config, OptimStateConfig)
        return replace(settings, optimizer_state=config.dtype)


register_method(OptimStateHandler())
