"""Global rank allocation: spend one parameter budget where truncation hurts most.

Each matrix j offers "units" (one more rank of a low-rank factorization, one
more atom of a dictionary ...), each at a cost in stored numbers. Adding its
k-th unit lowers the predicted loss by gains_j[k-1]; gains per parameter are
non-increasing in k (for a truncated SVD they are a sensitivity times the
squared singular values, which are sorted). Minimising the total predicted
loss within a parameter budget is then a knapsack whose greedy solution,
taking units in order of gain per parameter, is optimal up to the last unit
that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AllocationItem:
    """One matrix as the allocator sees it.

    gains[k] is the predicted loss decrease of its unit k+1 and costs[k] what
    that unit adds in stored numbers (m + n for one more rank; the last unit
    may differ, e.g. switching from the largest useful rank to the dense
    matrix). Units are taken in order.
    """

    costs: torch.Tensor  # (max_units,) positive integers
    gains: torch.Tensor  # (max_units,) non-negative
    min_units: int = 1

    def __post_init__(self) -> None:
        if self.costs.shape != self.gains.shape or self.costs.ndim != 1:
            raise ValueError(f"costs and gains must be 1-D of one length, got {tuple(self.costs.shape)} "
                             f"and {tuple(self.gains.shape)}")
        if bool((self.costs < 1).any()):
            raise ValueError("unit costs must be positive")

    @classmethod
    def uniform(cls, unit_cost: int, gains: torch.Tensor, min_units: int = 1) -> "AllocationItem":
        return cls(torch.full(gains.shape, unit_cost, dtype=torch.long), gains, min_units)

    @property
    def max_units(self) -> int:
        return int(self.gains.numel())


def allocate(items: list[AllocationItem], budget: int) -> list[int]:
    """Units per item minimising the total predicted loss within ``budget`` parameters.

    Every item gets at least ``min_units`` and at most ``max_units``; the total
    cost never exceeds ``budget``, and no further unit of any item fits in what
    is left (the budget is spent as exactly as the unit costs allow).
    Raises ValueError when the minimum units alone exceed the budget.
    """
    if not items:
        return []
    units = [min(it.min_units, it.max_units) for it in items]
    costs = [it.costs.to(torch.long) for it in items]
    left = budget - sum(int(c[:u].sum()) for u, c in zip(units, costs))
    if left < 0:
        raise ValueError(f"the minimum units already need {budget - left} parameters, more than the budget of {budget}")
    # Candidate units past each item's minimum, scored by gain per parameter.
    owner, score = [], []
    for j, (it, u) in enumerate(zip(items, units)):
        ratio = it.gains[u:].to(torch.float64) / costs[j][u:]
        # Clamp to non-increasing so the greedy order never takes unit k+1
        # before unit k (exact when the gains per parameter already decrease).
        ratio = torch.cummin(ratio, dim=0).values if ratio.numel() else ratio
        owner.append(torch.full((ratio.numel(),), j, dtype=torch.long))
        score.append(ratio)
    owner_t, score_t = torch.cat(owner), torch.cat(score)
    order = torch.sort(score_t, descending=True, stable=True).indices
    blocked = [False] * len(items)
    cheapest = min(int(c.min()) for c in costs if c.numel())
    for j in owner_t[order].tolist():
        if left < cheapest:
            break
        if blocked[j]:
            continue
        cost = int(costs[j][units[j]])
        if cost <= left:
            units[j] += 1
            left -= cost
        else:
            blocked[j] = True  # units are taken in order: none of its later units may be taken either
    return units
