"""SparseLowRankLinear: y = x @ (scale * B @ A + S).T + b, SLTrain's parameterization.

B (out x r) and A (r x in) are a low-rank product scaled by ``alpha / r``; S
is sparse on a fixed support of ``density`` * out * in entries drawn
uniformly at random from ``seed`` (``solvers.sparsity.random_support``). Only
the values of S on that support are parameters. The support itself is never
saved: it is rebuilt from the seed when the module is built, so a saved
model stores B, A, the values and the bias, nothing else. The spec carries a
checksum of the support, so a rebuilt support that differs (an edited seed,
a torch that draws other random numbers) is refused rather than loaded.

The forward pass builds the dense W in a scratch buffer, applies it and drops
it; the backward pass rebuilds it. Autograd through an explicit W would keep
one dense (out x in) matrix per layer alive from the forward to the backward
pass, which is exactly the memory that SLTrain sets out to save.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FactorkitError
from ..solvers.sparsity import random_support, support_size
from .base import FactorModule


def compose(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, support: torch.Tensor,
            scale: float) -> torch.Tensor:
    """The dense (out x in) matrix scale * B @ A + S, in a new buffer."""
    W = torch.mm(B, A).mul_(scale)
    W.view(-1).index_add_(0, support, values)
    return W


class _SparsePlusLowRank(torch.autograd.Function):
    """y = x @ W.T + b with W = scale * B @ A + S, saving only the factors for backward."""

    @staticmethod
    def forward(ctx, x, B, A, values, support, scale, bias):
        ctx.save_for_backward(x, B, A, values, support)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return F.linear(x, compose(B, A, values, support, scale), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, values, support = ctx.saved_tensors
        need_x, need_B, need_A, need_values = ctx.needs_input_grad[:4]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_B = grad_A = grad_values = grad_bias = None
        if need_x:
            grad_x = (g @ compose(B, A, values, support, ctx.scale)).view_as(x)
        if need_B or need_A or need_values:
            grad_W = g.T @ x.reshape(-1, x.shape[-1])  # (out x in) scratch, freed on return
            if need_B:
                grad_B = (grad_W @ A.T).mul_(ctx.scale)
            if need_A:
                grad_A = (B.T @ grad_W).mul_(ctx.scale)
            if need_values:
                grad_values = grad_W.view(-1).index_select(0, support)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = g.sum(0)
        return grad_x, grad_B, grad_A, grad_values, None, None, grad_bias


class SparseLowRankLinear(FactorModule):
    factor_type = "sparse_low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03, seed: int = 0,
                 alpha: float = 32.0, bias: bool = False, memory_efficient: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must lie in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.density, self.seed, self.alpha = float(density), int(seed), float(alpha)
        self.scale = self.alpha / rank
        # False: autograd through an explicit dense W (the reference the custom function is tested against)
        self.memory_efficient = memory_efficient
        kw = {"dtype": dtype, "device": device}
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.values = nn.Parameter(torch.empty(support_size(out_features, in_features, density), **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        # rebuilt from the seed, never saved
        self.register_buffer("support", random_support(out_features, in_features, density, seed).to(device),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's start: A as a Linear's weight (Kaiming uniform), B = 0, so W = S at
        first; the sparse values uniform in +-1/sqrt(in), as a dense Linear's entries."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_efficient:
            return _SparsePlusLowRank.apply(x, self.B, self.A, self.values, self.support, self.scale, self.bias)
        weight = (self.scale * self.B @ self.A).flatten().index_add(0, self.support, self.values)
        return F.linear(x, weight.view(self.out_features, self.in_features), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return compose(self.B, self.A, self.values, self.support, self.scale)

    def sparse_weight(self) -> torch.Tensor:
        """S alone, dense (out x in)."""
        S = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return S.index_add_(0, self.support, self.values).view(self.out_features, self.in_features)

    def support_checksum(self) -> str:
        """sha256 (first 16 hex digits) of the support's int64 indices: what a reload must rebuild."""
        return hashlib.sha256(self.support.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "density": self.density, "seed": self.seed, "alpha": self.alpha, "bias": self.bias is not None,
                "support_sha256": self.support_checksum()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None) -> "SparseLowRankLinear":
        spec = dict(spec)
        saved = spec.pop("support_sha256", None)  # absent in specs written before the checksum: not checked
        module = cls(**spec, dtype=dtype)
        # a module built on the meta device (shapes only) has no support to check; the real build checks it
        if saved is not None and not module.support.is_meta and saved != module.support_checksum():
            raise FactorkitError(
                f"the sparse support rebuilt from seed {module.seed} does not match the one the model was saved with "
                f"(checksum {module.support_checksum()}, saved {saved}); the folder was edited or this torch draws "
                "different random numbers, so restore the saved seed in factorkit.json or load the model with the "
                "torch version that saved it.")
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, nonzeros={self.values.numel()}, seed={self.seed}, "
                f"bias={self.bias is not None}")
