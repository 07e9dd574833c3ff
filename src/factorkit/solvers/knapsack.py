"""One budget over a menu of options per matrix: the multiple-choice knapsack.

Every targeted matrix j offers a menu of ways to store it (keep it dense, low
rank r, a dictionary (k, s), ...), option o costing ``costs[j][o]`` bytes and
predicted to add ``losses[j][o]`` to the model's loss. :func:`choose` picks one
option per matrix so that the bytes never exceed the budget and the summed
predicted loss is as small as possible.

How: dominated options are dropped (another option is no dearer and no worse);
what each option costs beyond its menu's cheapest is rounded *up* to a grid of
``buckets`` steps over the budget left after the cheapest options, and a
dynamic programme over that grid finds the exact optimum of the rounded
problem. Rounding up can only overstate costs, so the pick is never over
budget; the bytes rounding left unspent are then filled greedily (upgrades that
fit, best loss decrease first). The Lagrangian dual of the unrounded problem,
max over lam >= 0 of sum_j min_o (loss + lam cost) - lam budget, is a lower bound
on its optimum: ``Choice.gap`` = chosen loss - that bound certifies how far the
pick can be from optimal at all.

ROCKET (mts-ai/ROCKET) forms the same kind of menu per layer (rank and sparsity
options scored on calibration data) and solves it by a DP over a discretised
budget as well; here costs are bytes of every stored tensor (values at their
dtype plus index bits), the rounding is one-sided so the budget is a hard
limit, and the dual bound is reported with every solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Menu:
    """One matrix's options: ``costs`` in bytes (whole, >= 0), ``losses`` the predicted
    loss each adds (finite). ``labels`` name the options for reports."""

    costs: list[int]
    losses: list[float]
    labels: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.costs = [int(c) for c in self.costs]
        self.losses = [float(v) for v in self.losses]
        if not self.costs or len(self.costs) != len(self.losses):
            raise ValueError(f"a menu needs one loss per cost and at least one option, got {len(self.costs)} "
                             f"costs and {len(self.losses)} losses")
        if min(self.costs) < 0 or not all(math.isfinite(v) for v in self.losses):
            raise ValueError("option costs must be >= 0 and losses finite")
        if self.labels and len(self.labels) != len(self.costs):
            raise ValueError(f"{len(self.labels)} labels for {len(self.costs)} options")

    def frontier(self) -> list[int]:
        """Indices of the options no other option dominates, by increasing cost (and decreasing loss)."""
        order = sorted(range(len(self.costs)), key=lambda o: (self.costs[o], self.losses[o]))
        kept: list[int] = []
        for o in order:
            if not kept or self.losses[o] < self.losses[kept[-1]]:
                if kept and self.costs[o] == self.costs[kept[-1]]:
                    continue  # same cost, worse or equal loss: sorted, so never better
                kept.append(o)
        return kept


@dataclass
class Choice:
    """The option picked per menu, its bytes and predicted loss, and the dual bound."""

    picks: list[int]
    cost: int
    loss: float
    bound: float
    budget: int

    @property
    def gap(self) -> float:
        """Chosen loss minus the Lagrangian lower bound: the pick is at most this far from optimal."""
        return max(self.loss - self.bound, 0.0)


def _lower_hull(m: Menu, front: list[int]) -> list[int]:
    """The frontier options on the lower convex hull of (cost, loss)."""
    hull: list[int] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = ((m.costs[b] - m.costs[a]) * (m.losses[o] - m.losses[a])
                     - (m.losses[b] - m.losses[a]) * (m.costs[o] - m.costs[a]))
            if cross > 0:
                break
            hull.pop()  # b lies on or above the segment a-o
        hull.append(o)
    return hull


def lagrangian_bound(menus: list[Menu], budget: int) -> float:
    """max over lam >= 0 of sum_j min_o (loss_jo + lam cost_jo) - lam budget, a lower bound on the least
    total loss within ``budget``. It equals the linear relaxation (a fraction of an option allowed), which
    the greedy over the menus' convex-hull steps solves exactly."""
    fronts = [m.frontier() for m in menus]
    left = budget - sum(m.costs[f[0]] for m, f in zip(menus, fronts))
    value = sum(m.losses[f[0]] for m, f in zip(menus, fronts))
    steps = []  # (loss decrease per byte, bytes, loss decrease) of each hull step
    for m, front in zip(menus, fronts):
        hull = _lower_hull(m, front)
        for a, b in zip(hull, hull[1:]):
            dc, dl = m.costs[b] - m.costs[a], m.losses[a] - m.losses[b]
            steps.append((dl / dc if dc else math.inf, dc, dl))
    for rate, dc, dl in sorted(steps, key=lambda t: -t[0]):
        if dc <= left:
            value -= dl
            left -= dc
        else:
            value -= rate * left if left > 0 else 0.0
            break
    return value


def choose(menus: list[Menu], budget: int, buckets: int = 16384) -> Choice:
    """One option per menu, total cost <= ``budget``, least summed loss (exact up to rounding the
    costs to ``buckets`` steps, then topped up greedily). Raises ValueError when even the cheapest
    options exceed the budget."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a whole number of at least 1, got {buckets!r}")
    budget = int(budget)
    fronts = [m.frontier() for m in menus]
    base = sum(m.costs[f[0]] for m, f in zip(menus, fronts))
    if base > budget:
        raise ValueError(f"the cheapest option of every matrix already needs {base} bytes, more than the budget "
                         f"of {budget}")
    if not menus:
        return Choice([], 0, 0.0, 0.0, budget)
    residual = budget - base
    step = max(1, math.ceil(residual / buckets))  # bytes per bucket
    size = residual // step  # buckets the extra costs may fill
    dp = torch.zeros(size + 1, dtype=torch.float64)  # least loss with extra cost <= b buckets
    back = []
    for m, front in zip(menus, fronts):
        new = torch.full_like(dp, math.inf)
        arg = torch.full((size + 1,), -1, dtype=torch.int32)
        c0 = m.costs[front[0]]
        for i, o in enumerate(front):
            extra = -(-(m.costs[o] - c0) // step)  # rounded up
            if extra > size:
                break  # the frontier is sorted by cost: no later option fits either
            cand = dp[: size + 1 - extra] + m.losses[o]
            better = cand < new[extra:]
            new[extra:] = torch.where(better, cand, new[extra:])
            arg[extra:] = torch.where(better, torch.tensor(i, dtype=torch.int32), arg[extra:])
        dp = new
        back.append(arg)
    picks_f = [0] * len(menus)
    b = size
    for j in range(len(menus) - 1, -1, -1):
        i = int(back[j][b])
        picks_f[j] = i
        m, front = menus[j], fronts[j]
        b -= -(-(m.costs[front[i]] - m.costs[front[0]]) // step)
    picks = [front[i] for front, i in zip(fronts, picks_f)]
    picks = _top_up(menus, picks, budget)
    cost = sum(m.costs[o] for m, o in zip(menus, picks))
    loss = sum(m.losses[o] for m, o in zip(menus, picks))
    return Choice(picks, cost, loss, min(lagrangian_bound(menus, budget), loss), budget)


def _top_up(menus: list[Menu], picks: list[int], budget: int) -> list[int]:
    """Spend what rounding left: repeatedly take the switch that fits and lowers the loss most."""
    picks = list(picks)
    left = budget - sum(m.costs[o] for m, o in zip(menus, picks))
    while True:
        best = None
        for j, m in enumerate(menus):
            cur = picks[j]
            for o in range(len(m.costs)):
                gain = m.losses[cur] - m.losses[o]
                if gain > 0 and m.costs[o] - m.costs[cur] <= left and (best is None or gain > best[0]):
                    best = (gain, j, o)
        if best is None:
            return picks
        _, j, o = best
        left -= menus[j].costs[o] - menus[j].costs[picks[j]]
        picks[j] = o
