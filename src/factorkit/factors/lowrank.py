"""LowRankLinear: y = (x @ V.T) @ U.T + b, W ~ U @ V with U (out x r), V (r x in)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FactorModule, linear, plain


class LowRankLinear(FactorModule):
    factor_type = "low_rank"
    quantizable = ("U", "V")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        dtype = dtype or U.dtype
        module = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            module.U.copy_(U)
            module.V.copy_(V)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.V), self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return plain(self.U) @ plain(self.V)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
