"""DenseSparseLinear: DSFormer's trainable dense x semi-structured-sparse layer.

y = x @ (C B).T + b with a dense basis B (blocks*k x in) and coefficients C
(out x k) of which each row keeps ``sparsity`` entries (the largest
magnitudes, or n of every m along k). While training, C is a dense Parameter;
the forward pass uses C masked to its current magnitude pattern and, with
``learn_mask`` (the Straight-Through Factorizer), the backward pass gives every
entry its gradient, so entries enter and leave the support as training moves
them. Without ``learn_mask`` the stored ``mask`` is frozen and only the
surviving coefficients and the basis learn.

``export()`` freezes the mask and returns the compact inference module, a
``DictionaryLinear`` (basis as atoms, per-row values and a support bit mask),
which is what gets saved and served.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..solvers.sparsity import Pattern, magnitude_mask, straight_through
from .base import FactorModule
from .dictionary import DictionaryLinear


class DenseSparseLinear(FactorModule):
    factor_type = "dense_sparse"

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 blocks: int = 1, pattern: str = "topk", learn_mask: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if blocks < 1 or out_features % blocks:
            raise ValueError(f"blocks must divide the {out_features} output rows, got {blocks}")
        self.pattern = Pattern.parse(pattern)
        if self.pattern.structured and (atoms % self.pattern.m or sparsity != atoms * self.pattern.n // self.pattern.m):
            raise ValueError(f"an {self.pattern} pattern needs atoms divisible by {self.pattern.m} and "
                             f"sparsity = atoms * {self.pattern.n} / {self.pattern.m}")
        if not 1 <= sparsity <= atoms:
            raise ValueError(f"sparsity must lie in [1, {atoms}], got {sparsity}")
        self.in_features, self.out_features = in_features, out_features
        self.num_atoms, self.sparsity, self.blocks, self.learn_mask = atoms, sparsity, blocks, learn_mask
        kw = {"dtype": dtype, "device": device}
        self.basis = nn.Parameter(torch.empty(blocks * atoms, in_features, **kw))
        self.coef = nn.Parameter(torch.empty(out_features, atoms, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # the support in use: refreshed by every forward pass while the mask learns, frozen otherwise
        self.register_buffer("mask", torch.zeros(out_features, atoms, dtype=torch.bool, device=device))

    @classmethod
    def from_factors(cls, coef: torch.Tensor, basis: torch.Tensor, sparsity: int, bias: torch.Tensor | None = None,
                     blocks: int = 1, pattern: str = "topk", learn_mask: bool = True,
                     dtype: torch.dtype | None = None) -> "DenseSparseLinear":
        """From coefficients (out x k) and a basis (blocks*k x in); the mask starts
        as the magnitude pattern of ``coef``."""
        out, k = coef.shape
        module = cls(basis.shape[1], out, k, sparsity, bias is not None, blocks, pattern, learn_mask,
                     dtype=dtype or basis.dtype, device=basis.device)
        with torch.no_grad():
            module.basis.copy_(basis)
            module.coef.copy_(coef)
            module.mask.copy_(magnitude_mask(coef, sparsity, module.pattern))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def current_mask(self) -> torch.Tensor:
        """The support in force now: the magnitude pattern of C while the mask learns, the frozen mask otherwise."""
        return magnitude_mask(self.coef, self.sparsity, self.pattern) if self.learn_mask else self.mask

    def masked_coef(self) -> torch.Tensor:
        """C as the forward pass uses it (straight-through while the mask learns)."""
        if not self.learn_mask:
            return self.coef * self.mask
        mask = magnitude_mask(self.coef, self.sparsity, self.pattern)
        self.mask.copy_(mask)
        return straight_through(self.coef, mask)

    def _combine(self, h: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        if self.blocks == 1:
            return F.linear(h, coef, self.bias)
        rows = self.out_features // self.blocks
        y = torch.einsum("...gk,gok->...go", h.unflatten(-1, (self.blocks, self.num_atoms)),
                         coef.view(self.blocks, rows, self.num_atoms)).flatten(-2)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine(F.linear(x, self.basis), self.masked_coef())

    def dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            mask = self.current_mask()
            g, k, rows = self.blocks, self.num_atoms, self.out_features // self.blocks
            coef = (self.coef * mask).view(g, rows, k)
            return torch.bmm(coef, self.basis.view(g, k, self.in_features)).reshape(self.out_features, -1)

    def param_count(self) -> int:
        """Numbers the exported module stores: basis, nonzero coefficients, bias."""
        bias = self.out_features if self.bias is not None else 0
        return self.basis.numel() + self.out_features * self.sparsity + bias

    def index_bits(self) -> int:
        return self.out_features * self.num_atoms

    def freeze_mask(self) -> None:
        """Stop the support from moving: the current magnitude pattern becomes the mask."""
        with torch.no_grad():
            self.mask.copy_(magnitude_mask(self.coef, self.sparsity, self.pattern))
        self.learn_mask = False

    @torch.no_grad()
    def export(self) -> DictionaryLinear:
        """The compact inference module (values and a support bit mask)."""
        local = self.current_mask().nonzero()[:, 1].view(self.out_features, self.sparsity)
        values = torch.gather(self.coef, 1, local)
        offsets = DictionaryLinear._row_offsets(self.out_features, self.num_atoms, self.blocks, local.device)
        bias = self.bias.detach() if self.bias is not None else None
        return DictionaryLinear.from_codes(self.basis.detach(), local + offsets[:, None], values, bias,
                                           blocks=self.blocks)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "atoms": self.num_atoms,
                "sparsity": self.sparsity, "bias": self.bias is not None, "blocks": self.blocks,
                "pattern": str(self.pattern), "learn_mask": self.learn_mask}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.num_atoms}, "
                f"sparsity={self.sparsity}, blocks={self.blocks}, pattern={self.pattern}, "
                f"learn_mask={self.learn_mask}")
