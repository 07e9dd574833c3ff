"""Truncated SVD in three flavours: plain, input-scaled (ASVD), whitened (SVD-LLM).

Each returns factors U (out x r) and V (r x in) with W ~ U @ V, the square
root of the kept singular values folded into both sides so that neither
factor is badly scaled. All math is in float64; callers cast the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .whitening import cholesky_factor


@dataclass
class LowRankFactors:
    U: torch.Tensor  # (out, r)
    V: torch.Tensor  # (r, in)
    singular_values: torch.Tensor  # all singular values of the (scaled) matrix, descending
    shift: float = 0.0  # diagonal shift the whitening needed (SVD-LLM only)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def discarded_energy(self) -> float:
        """Sum of squares of the singular values that were cut off."""
        return float((self.singular_values[self.rank :] ** 2).sum())


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The largest rank whose factors remove at least ``ratio`` of the m*n parameters.

    A rank-r factorization stores r*(m+n) numbers, so r = floor((1-ratio)*m*n/(m+n)).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    m, n = out_features, in_features
    return math.floor((1.0 - ratio) * m * n / (m + n))


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must lie in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank}")


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-r approximation of W in the Frobenius norm (Eckart-Young)."""
    _check_rank(weight, rank)
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    U, V = _split(u, s, vh, rank)
    return LowRankFactors(U, V, s)


def scaled_svd(weight: torch.Tensor, column_scale: torch.Tensor, rank: int) -> LowRankFactors:
    """Truncated SVD of W @ diag(s), un-scaled afterwards: W ~ [W diag(s)]_r diag(1/s).

    ASVD uses s_j = mean|x_j|^alpha so that input channels with large
    activations are approximated more carefully. Zero scales are clamped to a
    tiny positive value so the un-scaling stays finite.
    """
    _check_rank(weight, rank)
    if column_scale.shape != (weight.shape[1],):
        raise ValueError(f"column_scale must have shape ({weight.shape[1]},), got {tuple(column_scale.shape)}")
    s_col = column_scale.to(torch.float64)
    floor = float(s_col.abs().max()) * 1e-8 or 1e-8
    s_col = s_col.clamp_min(floor)
    u, s, vh = torch.linalg.svd(weight.to(torch.float64) * s_col, full_matrices=False)
    U, V = _split(u, s, vh, rank)
    return LowRankFactors(U, V / s_col, s)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int, eps: float = 1e-6) -> LowRankFactors:
    """Rank-r W' minimising ||X W.T - X W'.T||_F, the SVD-LLM solution.

    With L the Cholesky factor of G = X.T X, the objective is ||(W - W') L||_F,
    so W' = [W L]_r L^-1 and the error is exactly the root of the sum of the
    squared discarded singular values of W L.
    """
    _check_rank(weight, rank)
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gram must have shape {(weight.shape[1],) * 2}, got {tuple(gram.shape)}")
    chol = cholesky_factor(gram, eps)
    L = chol.factor
    u, s, vh = torch.linalg.svd(weight.to(torch.float64) @ L, full_matrices=False)
    U, V_white = _split(u, s, vh, rank)
    # V = V_white @ L^-1, i.e. solve V @ L = V_white (L lower triangular)
    V = torch.linalg.solve_triangular(L, V_white, upper=False, left=False)
    return LowRankFactors(U, V, s, chol.shift)
