"""The math of the low-rank solvers, on small real tensors."""

import math

import pytest
import torch

from factorkit.factors import LowRankLinear
from factorkit.solvers import cholesky_factor, rank_for_ratio, scaled_svd, truncated_svd, whitened_svd


def _data(seed=0, m=24, n=16, tokens=200):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated inputs with very different channel scales, as in LLM activations
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X = X * torch.logspace(-1, 1, n, dtype=torch.float64)
    return W, X


@pytest.mark.parametrize("m,n,ratio", [(576, 576, 0.2), (1536, 576, 0.3), (192, 576, 0.4), (7, 5, 0.5)])
def test_rank_for_ratio_is_the_largest_rank_within_budget(m, n, ratio):
    r = rank_for_ratio(m, n, ratio)
    assert r * (m + n) <= (1 - ratio) * m * n < (r + 1) * (m + n)


def test_rank_for_ratio_known_value():
    assert rank_for_ratio(576, 576, 0.2) == math.floor(0.8 * 576 / 2) == 230


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_rank_for_ratio_rejects_ratios_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(10, 10, bad)


def test_truncated_svd_error_is_the_discarded_singular_values():
    W, _ = _data()
    f = truncated_svd(W, 5)
    s = torch.linalg.svdvals(W)
    assert f.U.shape == (24, 5) and f.V.shape == (5, 16)
    assert torch.allclose(torch.linalg.matrix_norm(W - f.U @ f.V) ** 2, (s[5:] ** 2).sum())


def test_whitened_truncation_error_equals_discarded_singular_values_of_W_L():
    W, X = _data()
    G = X.T @ X
    L = torch.linalg.cholesky(G)
    for rank in (1, 4, 9):
        f = whitened_svd(W, G, rank)
        out_err2 = torch.linalg.matrix_norm(X @ W.T - X @ (f.U @ f.V).T) ** 2
        discarded = (torch.linalg.svdvals(W @ L)[rank:] ** 2).sum()
        assert f.shift == 0.0
        assert torch.allclose(out_err2, discarded, rtol=1e-9)
        assert math.isclose(f.discarded_energy(), float(discarded), rel_tol=1e-9)


def test_whitened_svd_has_the_smallest_output_error_of_the_three():
    W, X = _data(seed=3)
    G = X.T @ X
    err = lambda f: float(torch.linalg.matrix_norm(X @ (W - f.U @ f.V).T))  # noqa: E731
    white = err(whitened_svd(W, G, 6))
    assert white < err(truncated_svd(W, 6))
    assert white < err(scaled_svd(W, (X.abs().mean(0)) ** 0.5, 6))


def test_scaled_svd_with_uniform_scale_is_plain_svd():
    W, _ = _data()
    a, b = scaled_svd(W, torch.full((16,), 3.0), 7), truncated_svd(W, 7)
    assert torch.allclose(a.U @ a.V, b.U @ b.V, atol=1e-10)


def test_cholesky_shifts_a_singular_gram_and_says_by_how_much():
    _, X = _data(tokens=5)  # 5 tokens, 16 channels: rank-5 Gram, not positive definite
    G = X.T @ X
    res = cholesky_factor(G)
    assert res.shift > 0
    assert torch.allclose(res.factor @ res.factor.T, G + res.shift * torch.eye(16, dtype=G.dtype), atol=1e-8 * G.abs().max())
    assert res.shift <= 2 * abs(float(torch.linalg.eigvalsh(G)[0])) + 1e-5 * float(G.diagonal().mean())


def test_whitened_svd_on_singular_gram_still_reconstructs_within_the_shifted_bound():
    W, X = _data(tokens=5)
    f = whitened_svd(W, X.T @ X, 3)
    assert f.shift > 0 and torch.isfinite(f.U).all() and torch.isfinite(f.V).all()


def test_low_rank_linear_applies_U_V_and_bias():
    U, V, b = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6)
    layer = LowRankLinear.from_factors(U, V, b)
    x = torch.randn(3, 4, 5)
    assert torch.allclose(layer(x), x @ (U @ V).T + b, atol=1e-6)
    assert layer.param_count() == 6 * 2 + 2 * 5 + 6
    assert layer.dense_param_count() == 6 * 5 + 6
    dense = layer.dense_equivalent()
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
