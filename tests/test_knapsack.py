"""The multiple-choice knapsack that spends one byte budget over every matrix's menu of options."""

import itertools
import random

import pytest

from factorkit.solvers.knapsack import Menu, choose, lagrangian_bound


def brute(menus, budget):
    best = None
    for picks in itertools.product(*[range(len(m.costs)) for m in menus]):
        cost = sum(m.costs[o] for m, o in zip(menus, picks))
        if cost <= budget:
            loss = sum(m.losses[o] for m, o in zip(menus, picks))
            best = loss if best is None else min(best, loss)
    return best


def _menu(rng, k, top):
    return Menu([rng.randint(0, top) for _ in range(k)], [rng.uniform(0, 10) for _ in range(k)])


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    menus = [_menu(rng, rng.randint(1, 4), 40) for _ in range(rng.randint(1, 5))]
    least = sum(min(m.costs) for m in menus)
    budget = least + rng.randint(0, 60)
    exact = choose(menus, budget, buckets=10_000)  # one byte per bucket: no rounding
    assert exact.cost <= budget
    assert exact.cost == sum(m.costs[o] for m, o in zip(menus, exact.picks))
    assert exact.loss == pytest.approx(brute(menus, budget), abs=1e-9)
    assert exact.bound <= exact.loss + 1e-9
    coarse = choose(menus, budget, buckets=3)  # costs rounded up hard: feasible, maybe worse, bound still below
    assert coarse.cost <= budget and coarse.loss >= exact.loss - 1e-9
    assert lagrangian_bound(menus, budget) <= brute(menus, budget) + 1e-9
    assert coarse.gap >= exact.loss - lagrangian_bound(menus, budget) - 1e-9


def test_the_cheapest_options_over_budget_is_an_error_naming_both_numbers():
    menus = [Menu([5, 9], [1.0, 0.0]), Menu([7], [0.0])]
    with pytest.raises(ValueError, match="12 bytes, more than the budget of 11"):
        choose(menus, 11)
    with pytest.raises(ValueError, match="one loss per cost"):
        Menu([1, 2], [0.0])
    with pytest.raises(ValueError, match="finite"):
        Menu([1], [float("nan")])


def test_dominated_options_are_never_picked_and_ties_take_the_cheaper():
    m = Menu([10, 10, 20, 15], [1.0, 2.0, 1.0, 0.5])
    assert m.frontier() == [0, 3]  # 1: same cost, worse; 2: dearer and no better
    pick = choose([m], 100).picks
    assert pick == [3]


def test_many_matrices_many_options_the_dual_certifies_a_near_optimal_pick():
    rng = random.Random(7)
    menus = []
    for _ in range(200):  # matrix-like menus: dense, then ranks with convex-ish losses, plus noisy extras
        size = rng.randint(50_000, 400_000)
        ranks = sorted(rng.sample(range(1, 100), 30))
        costs = [size] + [r * size // 100 for r in ranks] + [rng.randint(0, size) for _ in range(10)]
        scale = rng.uniform(0.1, 10)
        losses = [0.0] + [scale * (1 - r / 100) ** 3 for r in ranks] + [scale * rng.uniform(0, 1) for _ in range(10)]
        menus.append(Menu(costs, losses))
    total = sum(m.costs[0] for m in menus)
    # The linear relaxation differs from the best pick by at most one option step of one matrix
    # (the one it takes a fraction of): the certified gap must be below the largest such step.
    step = max(m.losses[a] - m.losses[b] for m in menus for a, b in zip(m.frontier(), m.frontier()[1:]))
    for ratio in (0.2, 0.5, 0.8):
        got = choose(menus, int((1 - ratio) * total))
        assert got.cost <= got.budget
        assert 0 < got.gap < step
