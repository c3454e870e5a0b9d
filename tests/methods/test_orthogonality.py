"""ELRT's regularizers: zero exactly when their condition holds, positive otherwise; the
training step adds weight x penalty to the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetrain.core.step import StepSettings, make_optimizer, train_step
from edgetrain.methods import orthogonality as orth
from edgetrain.methods.base import prepare


def _orthonormal(n: int, r: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(n + r), dtype=torch.float64))
    return q  # (n, r), orthonormal columns


@pytest.mark.parametrize("kind", ["so", "srip", "mc"])
def test_zero_exactly_for_orthonormal_columns(kind):
    reg = orth.REGULARIZERS[kind]
    q = _orthonormal(12, 5)
    assert reg(q).item() <= 1e-24 if kind != "mc" else reg(q).item() <= 1e-12
    assert reg(q * 1.01).item() > 1e-6  # columns no longer unit
    skew = q.clone()
    skew[:, 1] += 0.05 * q[:, 0]  # columns no longer orthogonal
    assert reg(skew).item() > 1e-6


def test_double_soft_orthogonality_needs_a_square_orthogonal_matrix():
    q = _orthonormal(8, 8)
    assert orth.double_soft_orthogonal(q).item() <= 1e-24
    assert orth.double_soft_orthogonal(_orthonormal(12, 5)).item() > 1.0  # M M^T != I when n > r
    assert orth.double_soft_orthogonal(q * 0.9).item() > 1e-3


def test_srip_is_the_squared_spectral_norm():
    m = torch.randn(10, 4, dtype=torch.float64)
    gap = m.T @ m - torch.eye(4, dtype=torch.float64)
    assert torch.allclose(orth.srip(m), torch.linalg.matrix_norm(gap, ord=2) ** 2)


def test_penalty_is_added_to_the_loss_with_its_weight():
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(10)), [])[0]
    model(torch.randn(1, 3, 8, 8))
    model = prepare(model, ["tucker2:ratio=0.5,init=random"])[0]  # fresh factors: far from orthonormal
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    plain = train_step(model, x, y, make_optimizer("sgd", model.parameters(), lr=0.0))
    pen = orth.penalty(model, "so").item()
    assert pen > 1e-2
    settings = StepSettings(orth="so", orth_weight=0.5)
    with_reg = train_step(model, x, y, make_optimizer("sgd", model.parameters(), lr=0.0), settings)
    assert with_reg.item() == pytest.approx(plain.item() + 0.5 * pen, rel=1e-5)


def test_training_with_the_regularizer_lowers_it():
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(576, 10)),
                    ["tucker2:ratio=0.5,init=random,reg=so,reg_weight=1.0"])[0]  # fmt: skip
    _, configs, settings = prepare(model, ["tucker2:reg=so,reg_weight=1.0"], inplace=True)
    opt = make_optimizer("sgd", model.parameters(), lr=0.01)
    start = orth.penalty(model, "so").item()
    for _ in range(20):
        train_step(model, torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), opt, settings)
    assert orth.penalty(model, "so").item() < 0.5 * start


def test_decomposed_factors_start_orthonormal():
    model = prepare(
        nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3), nn.Flatten(), nn.Linear(32, 10)), ["tucker2"]
    )[0]
    assert orth.penalty(model, "so").item() <= 1e-9
    assert orth.penalty(model, "mc").item() <= 1e-5
