"""Factorizations of conv and linear weights, in float64: Tucker-2 (HOSVD, refined by HOOI/ALS),
truncated SVD, CP by ALS, and the rank rules (fixed rank, FLOP ratio, energy kept).

A conv weight is (O, I, kh, kw). Tucker-2 keeps the spatial modes whole and factorizes the two
channel modes: W ~= core x_0 U_out x_1 U_in. CP writes W as a sum of R rank-one terms
A[:, r] o B[:, r] o Kh[:, r] o Kw[:, r], which is T1000's 1x1 . kx1 dw . 1xk dw . 1x1 chain.
Plain torch (no tensor library): these are a few SVDs and matmuls on kernels of a few MB.
"""

from __future__ import annotations

import math

import torch


def unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-`mode` unfolding: (w.shape[mode], everything else)."""
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def rank_for_energy(w: torch.Tensor, mode: int, energy: float) -> int:
    """Smallest rank of the mode-`mode` unfolding keeping `energy` of its squared singular values."""
    s2 = torch.linalg.svdvals(unfold(w.double(), mode)) ** 2  # (min dim,)
    kept = torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The `r` leading left singular vectors of `m` (n, r)."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r]


def tucker2(w: torch.Tensor, r_out: int, r_in: int, iters: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a (O, I, kh, kw) kernel by HOSVD, then `iters` HOOI (ALS) sweeps.

    Returns U_out (O, r_out) and U_in (I, r_in), both with orthonormal columns, and the core
    (r_out, r_in, kh, kw); exact when the ranks are full."""
    w = w.double()
    u_out, u_in = _leading(unfold(w, 0), r_out), _leading(unfold(w, 1), r_in)
    for _ in range(iters):
        u_out = _leading(unfold(torch.einsum("oihw,is->oshw", w, u_in), 0), r_out)
        u_in = _leading(unfold(torch.einsum("oihw,or->rihw", w, u_out), 1), r_in)
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)  # (r_out, r_in, kh, kw)
    return u_out, core, u_in


def tucker2_rebuild(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    return torch.einsum("rshw,or,is->oihw", core, u_out, u_in)


def svd2(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`r` truncated SVD of a (O, I) matrix as U·S (O, r) and V^T (r, I), V^T orthonormal rows."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r] * s[:r], vh[:r]


def cp_als(
    w: torch.Tensor, rank: int, iters: int = 50, tol: float = 1e-7, seed: int = 0
) -> tuple[list[torch.Tensor], float]:
    """CP decomposition of a (O, I, kh, kw) kernel by alternating least squares.

    Stable start: each factor's leading singular vectors (random unit columns beyond the mode's
    size); each update is a ridge-regularized solve of the normal equations, the first three
    factors kept at unit columns and the scale in the last, spread evenly over all four at the
    end. Returns [A (O,R), B (I,R), Kh (kh,R), Kw (kw,R)]
    and the relative reconstruction error."""
    w = w.double()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(4):
        u = _leading(unfold(w, mode), min(rank, w.shape[mode]))
        extra = torch.randn(w.shape[mode], rank - u.shape[1], generator=gen, dtype=w.dtype)
        factors.append(torch.cat([u, extra / extra.norm(dim=0).clamp_min(1e-12)], 1))  # (dim, R)
    norm_w, err = w.norm(), float("inf")
    for _ in range(iters):
        for mode in range(4):
            others = [f for k, f in enumerate(factors) if k != mode]
            gram = math.prod(f.T @ f for f in others)  # (R, R) Hadamard product of Gram matrices
            rhs = _mttkrp(w, factors, mode)  # (dim, R)
            ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
            factors[mode] = torch.linalg.solve(gram + ridge * torch.eye(rank, dtype=w.dtype), rhs.T).T
            if mode < 3:  # unit columns; the next modes' solves take the scale up
                factors[mode] = factors[mode] / factors[mode].norm(dim=0).clamp_min(1e-30)
        new = float((cp_rebuild(factors) - w).norm() / norm_w.clamp_min(1e-300))
        if abs(err - new) < tol:
            err = new
            break
        err = new
    return _balance(factors), err


def _mttkrp(w: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """Matricized tensor times Khatri-Rao product for one mode, contracted one mode at a time."""
    letters = "oihw"
    rest = [k for k in range(4) if k != mode]
    t = torch.einsum(f"{letters},{letters[rest[0]]}r->{letters.replace(letters[rest[0]], '')}r", w, factors[rest[0]])
    kept = letters.replace(letters[rest[0]], "")
    for k in rest[1:]:
        out = kept.replace(letters[k], "")
        t = torch.einsum(f"{kept}r,{letters[k]}r->{out}r", t, factors[k])
        kept = out
    return t  # (dim, R)


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each rank-one term's scale evenly over its four factors (better conditioned training)."""
    norms = [f.norm(dim=0).clamp_min(1e-30) for f in factors]
    scale = math.prod(norms) ** 0.25  # (R,)
    return [f / n * scale for f, n in zip(factors, norms, strict=True)]


def cp_rebuild(factors: list[torch.Tensor]) -> torch.Tensor:
    """The (O, I, kh, kw) weight of CP factors a (O, R), b (I, R), kh (kh, R), kw (kw, R): a times
    their Khatri-Rao product, so that nothing larger than the weight is made (a four-way einsum
    made O·I·kh·R first: 3.5 GB on resnet18 at ratio 1/4)."""
    a, b, kh, kw = factors
    kr = torch.einsum("ir,hr,wr->rihw", b, kh, kw)  # (R, I, kh, kw)
    return (a @ kr.flatten(1)).view(a.shape[0], b.shape[0], kh.shape[0], kw.shape[0])


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-300))


# --- rank rules: cost per output pixel, with the stride's extra input pixels counted -------------


def tucker2_ranks(o: int, i: int, k: int, stride: int, ratio: float) -> tuple[int, int]:
    """(r_out, r_in) with r/channels equal on both sides whose FLOPs are `ratio` of the conv's:
    i·r_in·s² + r_in·r_out·k + r_out·o = ratio·o·i·k (k = kh·kw; the first 1x1 runs at input size)."""
    a, b, c = o * i * k, i * i * stride**2 + o * o, ratio * o * i * k
    rho = (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
    return _clamp(rho * o, o), _clamp(rho * i, i)


def svd_rank(o: int, i: int, ratio: float) -> int:
    """Rank r of U·V with r·(o + i) = ratio·o·i."""
    return _clamp(ratio * o * i / (o + i), min(o, i))


def cp_rank(o: int, i: int, kh: int, kw: int, stride: int, ratio: float) -> int:
    """CP rank R whose chain costs `ratio` of the conv: R·(i·s² + kh·s + kw + o) = ratio·o·i·kh·kw."""
    return max(1, round(ratio * o * i * kh * kw / (i * stride**2 + kh * stride + kw + o)))


def _clamp(r: float, top: int) -> int:
    return max(1, min(top, round(r)))
