"""Differentiable 2-D discrete wavelet transforms of matrices, for WaRA.

Orthogonal wavelets (Haar = db1, Daubechies dbN, symlets symN, coiflets;
filters from PyWavelets) with periodized boundaries, PyWavelets' mode
"periodization": every level maps an (R x C) block to four (R/2 x C/2) bands
of the same total size, and the transform is orthogonal, so the inverse is
the exact transpose and DWT followed by IDWT is the identity. ``levels``
levels need both sides divisible by 2^levels (576, 192 and 1536, SmolLM2's
sizes, allow up to 6).

Layout: the Mallat pyramid in one matrix, as ``pywt.coeffs_to_array`` of
``pywt.wavedec2(..., mode="periodization")`` lays it out: the coarsest
approximation in the top-left corner, and at every level l (block R x C =
shape / 2^l) the bands [[LL, LH], [HL, HH]] with the first letter for the
rows (axis -2) and the second for the columns. Only LL is decomposed again,
so the multi-level inverse is not a product of one matrix on each side: a
rank-r coefficient matrix maps to a weight update of rank up to
r * (2 * levels - 1) (one level alone is separable and keeps the rank).

``lowrank_idwt_apply`` computes x @ IDWT(B @ A).T without building the
(out x in) update: it transforms the activations instead, at the cost of a
few LoRA products per level.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import pywt

    try:
        w = pywt.Wavelet(wavelet)
    except ValueError:
        raise ValueError(f"unknown wavelet {wavelet!r}; use an orthogonal one such as haar, db2, db4 or sym4") from None
    if not w.orthogonal:
        raise ValueError(f"wavelet {wavelet!r} is not orthogonal; use haar, dbN, symN or coifN")
    return tuple(w.dec_lo), tuple(w.dec_hi)


def filter_length(wavelet: str) -> int:
    return len(_filters(wavelet)[0])


def check_levels(shape: tuple[int, int], wavelet: str, levels: int) -> None:
    """Raise ValueError unless ``levels`` periodized levels fit an (R x C) matrix."""
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    length = filter_length(wavelet)
    for side in shape:
        if side % (1 << levels):
            raise ValueError(f"a side of {side} is not divisible by 2^{levels}; use fewer levels")
        if side >> (levels - 1) < length:
            raise ValueError(f"a side of {side} is shorter than the {wavelet} filter ({length}) at level {levels}; "
                             "use fewer levels or a shorter wavelet")


def max_levels(shape: tuple[int, int], wavelet: str) -> int:
    """The most levels ``check_levels`` accepts for this shape (0 if none)."""
    levels = 0
    while True:
        try:
            check_levels(shape, wavelet, levels + 1)
        except ValueError:
            return levels
        levels += 1


def _bank(wavelet: str, like: torch.Tensor) -> torch.Tensor:
    lo, hi = _filters(wavelet)
    # conv1d correlates; the periodized DWT convolves, so the filters are reversed
    return torch.tensor([lo[::-1], hi[::-1]], dtype=like.dtype, device=like.device).unsqueeze(1)


def _wrap_index(n: int, length: int, device) -> torch.Tensor:
    # pywt's periodization aligns output k with input 2k + L/2 - j for filter tap j
    return (torch.arange(n + length - 1, device=device) - (length // 2 - 1)) % n


def dwt1(x: torch.Tensor, wavelet: str) -> torch.Tensor:
    """One level along the last axis (even length n): [approximation | detail], n values."""
    n = x.shape[-1]
    bank = _bank(wavelet, x)
    padded = x.index_select(-1, _wrap_index(n, bank.shape[-1], x.device))
    out = F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), bank, stride=2)  # (batch, 2, n/2)
    return out.reshape(*x.shape[:-1], n)


def idwt1(c: torch.Tensor, wavelet: str) -> torch.Tensor:
    """Inverse of ``dwt1`` (its transpose) along the last axis."""
    n = c.shape[-1]
    bank = _bank(wavelet, c)
    length = bank.shape[-1]
    up = F.conv_transpose1d(c.reshape(-1, 2, n // 2), bank, stride=2)  # (batch, 1, n + L - 2)
    up = F.pad(up, (0, 1)).reshape(*c.shape[:-1], n + length - 1)
    return torch.zeros_like(c).index_add_(-1, _wrap_index(n, length, c.device), up)


def _on_rows(fn, x: torch.Tensor, wavelet: str) -> torch.Tensor:
    return fn(x.transpose(-1, -2), wavelet).transpose(-1, -2)


def _paste(full: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``full`` with its top-left corner replaced by ``block`` (out of place, differentiable)."""
    r, c = block.shape[-2:]
    top = torch.cat([block, full[..., :r, c:]], dim=-1)
    return torch.cat([top, full[..., r:, :]], dim=-2)


def dwt2(x: torch.Tensor, wavelet: str = "haar", levels: int = 1) -> torch.Tensor:
    """Multi-level 2-D DWT of the last two axes, the pyramid in one matrix (see module doc)."""
    check_levels(tuple(x.shape[-2:]), wavelet, levels)
    out = x
    for level in range(levels):
        r, c = x.shape[-2] >> level, x.shape[-1] >> level
        out = _paste(out, _on_rows(dwt1, dwt1(out[..., :r, :c], wavelet), wavelet))
    return out


def idwt2(c: torch.Tensor, wavelet: str = "haar", levels: int = 1) -> torch.Tensor:
    """Inverse of ``dwt2``: idwt2(dwt2(x)) == x up to rounding."""
    check_levels(tuple(c.shape[-2:]), wavelet, levels)
    out = c
    for level in reversed(range(levels)):
        r, k = c.shape[-2] >> level, c.shape[-1] >> level
        out = _paste(out, idwt1(_on_rows(idwt1, out[..., :r, :k], wavelet), wavelet))
    return out


def lowrank_idwt_apply(x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, wavelet: str, levels: int) -> torch.Tensor:
    """x @ idwt2(B @ A, wavelet, levels).T for x (..., in), B (out x r), A (r x in),
    without forming the (out x in) matrix.

    One level of the inverse is W = S_o^T M S_i with S the 1-D DWT matrices and
    M the coefficients whose top-left quadrant is itself the inverse of the
    next level. So x @ W.T = idwt1(dwt1(x) @ M.T), and M = B @ A with its
    top-left block B1 @ A1 swapped for the next level's inverse of B1 @ A1:
    two low-rank products per level plus the recursion on the low halves.
    """
    if levels == 0:
        return (x @ A.T) @ B.T
    xs = dwt1(x, wavelet)
    half_in, half_out = A.shape[1] // 2, B.shape[0] // 2
    z = (xs @ A.T) @ B.T
    low = xs[..., :half_in]
    B1, A1 = B[:half_out], A[:, :half_in]
    correction = lowrank_idwt_apply(low, B1, A1, wavelet, levels - 1) - (low @ A1.T) @ B1.T
    z = torch.cat([z[..., :half_out] + correction, z[..., half_out:]], dim=-1)
    return idwt1(z, wavelet)
