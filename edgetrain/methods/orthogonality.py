"""ELRT's orthogonality regularizers on the factor matrices of low-rank layers (Bansal et al.'s
forms). Each takes a matrix M (n, r) whose columns should be orthonormal and returns a scalar:

- so: soft orthogonality, ||M^T M - I||_F^2 (zero iff the columns are orthonormal);
- dso: double soft orthogonality, ||M^T M - I||_F^2 + ||M M^T - I||_F^2 (zero iff M is square
  and orthogonal);
- srip: spectral restricted isometry, sigma_max(M^T M - I)^2 (zero iff orthonormal columns);
- mc: mutual coherence, max |M^T M - I| entrywise (zero iff orthonormal columns).

`penalty(model, kind)` sums one of them over every factorized layer; the training step adds
`weight * penalty` to the loss (the tucker2 method's reg=..., reg_weight=...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgetrain.core.step import register_loss_term


def _gram_gap(m: torch.Tensor) -> torch.Tensor:
    g = m.T @ m  # (r, r)
    return g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def soft_orthogonal(m: torch.Tensor) -> torch.Tensor:
    return _gram_gap(m).square().sum()


def double_soft_orthogonal(m: torch.Tensor) -> torch.Tensor:
    return soft_orthogonal(m) + soft_orthogonal(m.T)


def srip(m: torch.Tensor) -> torch.Tensor:
    """Largest |eigenvalue| of the symmetric M^T M - I, squared: its spectral norm, exactly."""
    return torch.linalg.eigvalsh(_gram_gap(m)).abs().max().square()


def mutual_coherence(m: torch.Tensor) -> torch.Tensor:
    return _gram_gap(m).abs().max()


REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "so": soft_orthogonal,
    "dso": double_soft_orthogonal,
    "srip": srip,
    "mc": mutual_coherence,
}


def factor_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Every factor matrix of every factorized layer that is being trained."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        if hasattr(m, "factor_matrices"):
            out += [f for f in m.factor_matrices() if f.requires_grad]
    return out


def penalty(model: nn.Module, kind: str) -> torch.Tensor:
    """Sum of regularizer `kind` over the model's factor matrices, in fp32 (outside autocast)."""
    reg = REGULARIZERS[kind]
    mats = factor_matrices(model)
    if not mats:
        return torch.zeros(())
    with torch.autocast(mats[0].device.type, enabled=False):
        return torch.stack([reg(f.float()) for f in mats]).sum()


for _kind in REGULARIZERS:
    register_loss_term(_kind, lambda model, kind=_kind: penalty(model, kind))
