"""Model zoo: torchvision's architectures by name plus edgetrain's own, as thin factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgetrain._registry import Registry
from edgetrain.errors import ConfigError

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "vgg11", "vgg11_bn", "vgg16_bn", "alexnet", "squeezenet1_1", "efficientnet_b0", "shufflenet_v2_x1_0",
)  # fmt: skip


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    def make(num_classes: int = 10) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    make.__name__ = name
    return make


for _n in _TORCHVISION:
    MODELS.register(_n, _torchvision_factory(_n))


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: `@register_model def my_net(num_classes=10): ...` makes it known by name."""
    return MODELS.register(fn.__name__, fn)


def list_models(pattern: str = "*") -> list[str]:
    """Known model names matching a shell-style pattern, e.g. list_models('resnet*')."""
    _load_own()
    return MODELS.list(pattern)


def create_model(name: str, num_classes: int = 10, weights: str | Path | None = None) -> nn.Module:
    """Build a model by name with random init (nothing is downloaded); `weights`: a local file."""
    _load_own()
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    model = MODELS.get(name)(num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (or an edgetrain checkpoint's 'model' entry) into `model`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: give a local .pt file (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ConfigError(
            f"weights file {path} cannot be read ({type(e).__name__}): is it a torch state dict?"
        ) from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state dict: give a model.pt")
    own = model.state_dict()
    other = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if other:  # another architecture (or width, or class count) under the same names
        k = other[0]
        raise ConfigError(
            f"weights file {path} is of another model: {len(other)} tensors differ in shape, e.g. '{k}' is "
            f"{tuple(state[k].shape)} there and {tuple(own[k].shape)} here: give --model the checkpoint's architecture"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"weights file {path} does not match the model: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )


def _load_own() -> None:
    """Import edgetrain's own models so that they register themselves (once)."""
    from edgetrain.models import cifar, revnet  # noqa: F401
