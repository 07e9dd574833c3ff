"""Pure tensor math: no nn.Module, no knowledge of models.

Convention: a weight W has shape (out_features, in_features) and a layer
computes y = x @ W.T. Calibration inputs X are rows (tokens x in_features)
and their Gram matrix is G = X.T @ X.
"""

from .allocation import AllocationItem, allocate
from .lowrank import (
    LowRankFactors,
    rank_for_ratio,
    scaled_svd,
    truncated_svd,
    weighted_svd,
    whitened_svd,
)
from .whitening import CholeskyResult, cholesky_factor

__all__ = [
    "AllocationItem",
    "CholeskyResult",
    "LowRankFactors",
    "allocate",
    "cholesky_factor",
    "rank_for_ratio",
    "scaled_svd",
    "truncated_svd",
    "weighted_svd",
    "whitened_svd",
]
