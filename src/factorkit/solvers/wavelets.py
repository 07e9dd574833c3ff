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

``lowrank_idwt_factors`` writes IDWT(B @ A) as one low-rank product of
transformed factors, so a layer applies it as LoRA does, without ever
forming the (out x in) update.
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


def lowrank_idwt_factors(B: torch.Tensor, A: torch.Tensor, wavelet: str, levels: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (Bt, At) with Bt @ At == idwt2(B @ A, wavelet, levels), of rank
    r * (2 * levels - 1), computed from B (out x r) and A (r x in) alone.

    One level of the inverse is W = S_o^T M S_i (S: the 1-D DWT matrices) where
    M is B @ A with its top-left block B1 @ A1 (B1, A1: the first halves)
    replaced by the deeper levels' inverse of B1 @ A1. Written as one product,
    M = [B, -B1, Bd] @ [A; A1; Ad] (B1, A1, Bd, Ad padded with zeros to the
    full size), with (Bd, Ad) the factors of the deeper levels, so W is the
    product of S_o^T [B, -B1, Bd] and [A; A1; Ad] S_i: only the thin factors
    are transformed, never an (out x in) matrix, and a layer applies the
    update as x @ At.T @ Bt.T.
    """
    if levels > 1:
        half_out, half_in = B.shape[0] // 2, A.shape[1] // 2
        B1, A1 = B[:half_out], A[:, :half_in]
        Bd, Ad = lowrank_idwt_factors(B1, A1, wavelet, levels - 1)
        B = torch.cat([B, F.pad(torch.cat([-B1, Bd], dim=1), (0, 0, 0, B.shape[0] - half_out))], dim=1)
        A = torch.cat([A, F.pad(torch.cat([A1, Ad], dim=0), (0, A.shape[1] - half_in))], dim=0)
    return idwt1(B.T, wavelet).T, idwt1(A, wavelet)
