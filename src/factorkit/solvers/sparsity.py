"""Semi-structured sparsity for DSFormer: magnitude masks, the straight-through
mask, the dense x sparse budget, and a data-aware starting point.

Convention (nn.Linear's): a weight W (out x in) becomes C @ B with a dense
basis B (k x in) and sparse coefficients C (out x k). Every row of C keeps the
same number of nonzeros, either the s largest magnitudes of the row ("topk") or
n of every m consecutive entries along k ("n:m"). The paper writes the same
factorization as x @ D @ S for a weight stored (in x out); in nn.Linear's
layout the sparse factor is the left one, so an n:m pattern runs along k,
the reduction dimension of the second product, as GPU semi-structured kernels
need (2:4 along the reduction dimension).

With ``blocks`` > 1 the rows of W are split into that many equal groups, each
with its own basis (k x in) and coefficients (out/blocks x k).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """Which entries of a coefficient row survive: the ``s`` largest (m == 0) or
    ``n`` of every ``m`` consecutive ones along k."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """"topk" or "n:m" (e.g. "2:4")."""
        if text == "topk":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text.strip())
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern {text!r} is neither 'topk' nor 'n:m' with 0 < n < m (e.g. '2:4')")
        return cls(int(match[1]), int(match[2]))

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "topk"

    def sparsity(self, atoms: int, rho: float) -> int:
        """Nonzeros per row for ``atoms`` columns: floor(atoms / rho), or atoms * n / m."""
        return atoms * self.n // self.m if self.structured else math.floor(atoms / rho)

    def atoms_multiple(self) -> int:
        """k is rounded down to this: for n:m patterns a multiple of m and of 16, the
        granularity GPU semi-structured kernels need."""
        return math.lcm(self.m, 16) if self.structured else 1


def magnitude_mask(coef: torch.Tensor, sparsity: int, pattern: Pattern = Pattern()) -> torch.Tensor:
    """Boolean mask of ``coef`` (rows x k) keeping, per row, the ``sparsity``
    largest magnitudes, or for an n:m pattern the n largest of every m
    consecutive entries (k a multiple of m)."""
    rows, k = coef.shape
    score = coef.detach().abs()
    if pattern.structured:
        if k % pattern.m:
            raise ValueError(f"an {pattern} pattern needs k divisible by {pattern.m}, got {k}")
        groups = score.view(rows, k // pattern.m, pattern.m)
        keep = groups.topk(pattern.n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(rows, k)
    if not 0 < sparsity <= k:
        raise ValueError(f"sparsity must lie in [1, {k}], got {sparsity}")
    keep = score.topk(sparsity, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)


def straight_through(coef: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``coef * mask`` in the forward pass, the identity in the backward pass:
    every entry, masked or not, gets the gradient of its position, so entries
    can enter and leave the support while training."""
    return coef + (coef * mask - coef).detach()


def dense_sparse_budget(in_features: int, out_features: int, ratio: float, rho: float = 2.0, *,
                        pattern: Pattern = Pattern(), blocks: int = 1, count: str = "params",
                        value_bits: int = 16) -> tuple[int, int]:
    """Atoms k per block and nonzeros s per row removing ``ratio`` of an (out x in) matrix.

    Stored: blocks * k * in basis numbers, out * s coefficient values, and, with
    count="storage", the support as one bit per (row, atom) pair (out * k bits).
    s = floor(k / rho) for "topk", k * n / m for an n:m pattern (k rounded down
    to a multiple of m and 16):
        params:  k = floor((1 - ratio) * in * out / (blocks * in + out / rho'))
        storage: k = floor((1 - ratio) * in * out * b / ((blocks * in + out / rho') * b + out))
    with rho' = k / s.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if blocks < 1 or out_features % blocks:
        raise ValueError(f"blocks must divide the {out_features} rows, got {blocks}")
    rho = pattern.m / pattern.n if pattern.structured else rho
    if rho < 1.0:
        raise ValueError(f"rho = atoms / nonzeros must be at least 1, got {rho}")
    n, m, b = in_features, out_features, value_bits
    if count == "params":
        k = math.floor((1.0 - ratio) * n * m / (blocks * n + m / rho))
    elif count == "storage":
        k = math.floor((1.0 - ratio) * n * m * b / ((blocks * n + m / rho) * b + m))
    else:
        raise ValueError(f"count must be 'params' or 'storage', got {count!r}")
    k -= k % pattern.atoms_multiple()
    return k, pattern.sparsity(k, rho)


def dense_sparse_cost(in_features: int, out_features: int, atoms: int, sparsity: int, *, blocks: int = 1,
                      value_bits: int = 16) -> tuple[int, int]:
    """(numbers stored, bits stored) by a dense x sparse factorization."""
    numbers = blocks * atoms * in_features + out_features * sparsity
    return numbers, numbers * value_bits + out_features * atoms


def refit_basis(W: torch.Tensor, coef: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares basis B (k x in) for fixed coefficients C: argmin ||(W - C B) L||
    for any invertible L, i.e. B = (C^T C)^-1 C^T W (a tiny ridge keeps unused atoms finite)."""
    ctc = coef.T @ coef
    ctc.diagonal().add_(ridge * float(ctc.diagonal().max().clamp_min(1e-30)))
    return torch.linalg.solve(ctc, coef.T @ W)


def refit_coefficients(W: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor | None = None,
                       ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares coefficients on a fixed support, row by row (batched):
    argmin over c with support I of ||(w - c_I B_I) L||, L L^T = gram (identity if None):
    c_I = w G B_I^T (B_I G B_I^T)^-1. Rows of ``mask`` must all hold the same count."""
    rows, k = mask.shape
    s = int(mask[0].sum())
    idx = mask.nonzero()[:, 1].view(rows, s)
    BG = basis if gram is None else basis @ gram  # (k, in)
    A = BG @ basis.T  # B G B^T (k x k)
    rhs = W @ BG.T  # (rows, k): w G B^T
    sub = A[idx.unsqueeze(2), idx.unsqueeze(1)]  # (rows, s, s)
    eye = torch.eye(s, dtype=A.dtype, device=A.device)
    sub = sub + ridge * sub.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-30)[:, None, None] * eye
    vals = torch.linalg.solve(sub, torch.gather(rhs, 1, idx).unsqueeze(2)).squeeze(2)
    return torch.zeros(rows, k, dtype=W.dtype, device=W.device).scatter_(1, idx, vals)


def whitened_dense_sparse(W: torch.Tensor, atoms: int, sparsity: int, pattern: Pattern = Pattern(),
                          gram: torch.Tensor | None = None, rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A data-aware starting point (coefficients C (out x k), with zeros off the
    support, and basis B (k x in)) for one block of rows.

    Rank-k whitened SVD W L = U S V^T (SVD-LLM's factorization, L L^T = gram),
    split evenly, C = U S^1/2 and B = S^1/2 V^T L^-1; then C is cut to its
    magnitude mask and ``rounds`` of alternating least squares (basis for the
    coefficients, coefficients on the support for the basis) recover what the
    cut lost in the whitened error."""
    from .whitening import cholesky_factor

    W = W.to(torch.float64)
    out_f, in_f = W.shape
    k = atoms
    L = cholesky_factor(gram.to(torch.float64)).factor if gram is not None else None
    Wl = W @ L if L is not None else W
    U, S, Vh = torch.linalg.svd(Wl, full_matrices=False)
    r = min(k, S.numel())
    root = S[:r].sqrt()
    C = torch.zeros(out_f, k, dtype=torch.float64, device=W.device)
    C[:, :r] = U[:, :r] * root
    Bl = torch.zeros(k, in_f, dtype=torch.float64, device=W.device)
    Bl[:r] = root[:, None] * Vh[:r]
    B = torch.linalg.solve_triangular(L, Bl, upper=False, left=False) if L is not None else Bl  # Bl L^-1
    mask = magnitude_mask(C, sparsity, pattern)
    C = C * mask
    for _ in range(rounds):
        B = refit_basis(W, C)
        C = refit_coefficients(W, B, mask, gram.to(torch.float64) if gram is not None else None)
    return C, B


# --- SLTrain: a fixed random support, regenerated from a seed ---------------------------------

def support_size(out_features: int, in_features: int, density: float) -> int:
    """Nonzeros of a random support of ``density`` over an (out x in) matrix (at least 1)."""
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must lie in (0, 1), got {density}")
    return max(1, round(density * out_features * in_features))


def random_support(out_features: int, in_features: int, density: float, seed: int) -> torch.Tensor:
    """Flat row-major indices (sorted, int64) of ``support_size`` entries of an
    (out x in) matrix, drawn uniformly without replacement. A function of its
    arguments only: drawn on the CPU from its own generator, so the same seed
    gives the same support on every device and after every reload, and the
    support never needs to be stored."""
    nnz = support_size(out_features, in_features, density)
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(out_features * in_features, generator=generator)[:nnz]
    return chosen.sort().values
