"""WaRALinear: a frozen Linear plus a low-rank update learned in the wavelet domain.

    y = base(x) + (alpha / r) * dropout(x) @ IDWT(B @ A).T

B (out x r) and A (r x in) hold the update's wavelet coefficients; IDWT is the
multi-level periodized 2-D inverse transform of ``solvers.wavelets``. B starts
at zero and A as a Linear's weight (Kaiming uniform), so the update is zero
at the start, as LoRA's is. The forward pass never forms the (out x in)
update: the wavelet pyramid is applied to the thin factors, which gives
IDWT(B @ A) as one product Bt @ At of rank r * (2 * levels - 1)
(``solvers.wavelets.lowrank_idwt_factors``), and the layer applies it as
LoRA applies B @ A. ``merge()`` adds the update to the base weight
and keeps the weight it replaced, so ``unmerge()`` restores the base weight
bit for bit (subtracting the update again would round); unloading a merged
model (``adapters.wara.merge_and_unload``) drops that copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..solvers.wavelets import check_levels, lowrank_idwt_factors


class WaRALinear(nn.Module):
    adapter_type = "wara"

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, wavelet: str = "haar", levels: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"WaRA adapts nn.Linear layers, got {type(base).__name__}")
        out_f, in_f = base.weight.shape
        if not 1 <= rank <= min(in_f, out_f):
            raise ValueError(f"rank must lie in [1, {min(in_f, out_f)}], got {rank}")
        check_levels((out_f, in_f), wavelet, levels)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.wavelet, self.levels = rank, float(alpha), wavelet, levels
        self.scale = self.alpha / rank
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.A = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.B = nn.Parameter(torch.zeros(out_f, rank, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        """The (out x in) update this adapter adds: scale * IDWT(B @ A)."""
        Bt, At = self.factors()
        return self.scale * (Bt @ At)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bt, At) with Bt @ At = IDWT(B @ A), differentiable in B and A."""
        return lowrank_idwt_factors(self.B, self.A, self.wavelet, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        Bt, At = self.factors()
        update = (self.dropout(x).to(At.dtype) @ At.T) @ (self.scale * Bt).T
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference without the adapter's cost)."""
        if self.merged:
            return
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge()``."""
        if not self.merged:
            return
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "wavelet": self.wavelet, "levels": self.levels}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, wavelet={self.wavelet}, levels={self.levels}, merged={self.merged}")
