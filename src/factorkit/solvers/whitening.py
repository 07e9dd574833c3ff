"""Whitening: a factor L of a Gram matrix with L @ L.T = G.

With G = X.T @ X, ||X @ A.T||_F = ||A @ L||_F for any A, so an error measured
on the calibration outputs becomes a plain Frobenius error after
multiplying on the right by L. That identity is what SVD-LLM and CoSpaDi
build on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CholeskyResult:
    factor: torch.Tensor  # lower triangular L, L @ L.T = gram + shift * I
    shift: float  # 0.0 when the Gram matrix was positive definite as given


def cholesky_factor(gram: torch.Tensor, eps: float = 1e-6) -> CholeskyResult:
    """Lower Cholesky factor of a symmetric Gram matrix, in float64.

    A Gram matrix from calibration data is often only semi-definite (dead
    input channels, fewer tokens than channels, rounding). Then the diagonal
    is shifted by the magnitude of the smallest eigenvalue plus
    ``eps * mean(diag(G))`` and the shift is returned so the caller can log it.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    g = gram.to(torch.float64)
    g = (g + g.T) / 2
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return CholeskyResult(factor, 0.0)
    scale = float(g.diagonal().mean().abs()) or 1.0
    lam_min = float(torch.linalg.eigvalsh(g)[0])
    shift = max(-lam_min, 0.0) + eps * scale
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(8):  # eigvalsh itself is only accurate to ~1e-16 * ||G||
        factor, info = torch.linalg.cholesky_ex(g + shift * eye)
        if int(info) == 0:
            return CholeskyResult(factor, shift)
        shift *= 10
    raise ValueError("the Gram matrix could not be made positive definite by a diagonal shift")
