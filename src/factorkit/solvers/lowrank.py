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


def _positive_scale(scale: torch.Tensor, size: int, what: str) -> torch.Tensor:
    if scale.shape != (size,):
        raise ValueError(f"{what} must have shape ({size},), got {tuple(scale.shape)}")
    s = scale.to(torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"{what} must be finite and non-negative")
    # Zero scales are clamped to a tiny positive value so un-scaling stays finite.
    floor = float(s.max()) * 1e-8 or 1e-8
    return s.clamp_min(floor)


def weighted_svd(weight: torch.Tensor, rank: int, row_scale: torch.Tensor | None = None,
                 column_scale: torch.Tensor | None = None) -> LowRankFactors:
    """Rank-r W' minimising ||diag(a) (W - W') diag(b)||_F, a = row_scale, b = column_scale.

    Closed form: truncate the SVD of diag(a) W diag(b), then undo the scaling on
    the factors. With one-sided scales this is exact (the weighted problem is an
    unweighted one in scaled coordinates); FWSVD takes a = sqrt(Fisher per output
    row) or b = sqrt(Fisher per input column), ASVD takes b = mean|x|^alpha.
    """
    _check_rank(weight, rank)
    W = weight.to(torch.float64)
    a = _positive_scale(row_scale, W.shape[0], "row_scale") if row_scale is not None else None
    b = _positive_scale(column_scale, W.shape[1], "column_scale") if column_scale is not None else None
    scaled = W if a is None else a[:, None] * W
    scaled = scaled if b is None else scaled * b
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    U, V = _split(u, s, vh, rank)
    return LowRankFactors(U if a is None else U / a[:, None], V if b is None else V / b, s)


def scaled_svd(weight: torch.Tensor, column_scale: torch.Tensor, rank: int) -> LowRankFactors:
    """Truncated SVD of W @ diag(s), un-scaled afterwards: W ~ [W diag(s)]_r diag(1/s).

    ASVD uses s_j = mean|x_j|^alpha so that input channels with large
    activations are approximated more carefully.
    """
    return weighted_svd(weight, rank, column_scale=column_scale)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int, eps: float = 1e-6,
                 row_scale: torch.Tensor | None = None) -> LowRankFactors:
    """Rank-r W' minimising ||diag(a) (W - W') X.T||_F: SVD-LLM, optionally row-weighted.

    With L the Cholesky factor of G = X.T X, the objective is ||diag(a) (W - W') L||_F,
    so W' = diag(1/a) [diag(a) W L]_r L^-1 and the error is exactly the root of the
    sum of the squared discarded singular values of diag(a) W L. Without
    ``row_scale`` (a = 1) this is SVD-LLM; with a = sqrt(Fisher per output row) it
    weights each output channel's calibration error by its importance to the loss.
    """
    _check_rank(weight, rank)
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gram must have shape {(weight.shape[1],) * 2}, got {tuple(gram.shape)}")
    a = _positive_scale(row_scale, weight.shape[0], "row_scale") if row_scale is not None else None
    chol = cholesky_factor(gram, eps)
    L = chol.factor
    W = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd((W if a is None else a[:, None] * W) @ L, full_matrices=False)
    U, V_white = _split(u, s, vh, rank)
    # V = V_white @ L^-1, i.e. solve V @ L = V_white (L lower triangular)
    V = torch.linalg.solve_triangular(L, V_white, upper=False, left=False)
    return LowRankFactors(U if a is None else U / a[:, None], V, s, chol.shift)
