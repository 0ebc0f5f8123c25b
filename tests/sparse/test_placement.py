"""Budget-weighted head placement: LPT against the exact optimum on small cases."""

import random

import pytest

from fapool.core.head_placement import contiguous_heads, lpt_heads
from fapool.sparse.placement import (
    balance_report,
    brute_force_check,
    head_weights,
    layer_loads,
    optimal_heads,
)


@pytest.mark.parametrize("seed", range(40))
def test_lpt_within_graham_bound_of_optimum(seed):
    rng = random.Random(seed)
    num_workers = rng.randint(2, 4)
    num_heads = rng.randint(num_workers, 8)
    weights = [
        rng.choice([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0]) * rng.uniform(0.5, 1.5) for _ in range(num_heads)
    ]
    cont, lpt, best = brute_force_check(num_heads, num_workers, weights)
    opt = max(layer_loads(optimal_heads(num_heads, list(range(num_workers)), weights), weights))
    assert opt == pytest.approx(best)  # the pruned search finds the enumeration's optimum
    # Graham's LPT bound (loads are sums in different orders: compare with a rounding slack)
    assert best - 1e-12 <= lpt <= (4 / 3 - 1 / (3 * num_workers)) * best + 1e-9
    assert best <= cont + 1e-12


def test_lpt_beats_contiguous_on_skewed_budgets():
    weights = [1.0, 0.9, 0.1, 0.1, 0.05, 0.05]  # heavy heads side by side
    workers = [0, 1]
    cont = max(layer_loads(contiguous_heads(6, workers), weights))
    lpt = lpt_heads(6, workers, weights)
    assert max(layer_loads(lpt, weights)) < cont
    assert sorted(h for hs in lpt.values() for h in hs) == list(range(6))


def test_balance_report_equal_budgets_is_balanced():
    budgets = [[0.3] * 4 for _ in range(3)]
    for per_layer in (True, False):
        rep = balance_report(budgets, 2, per_layer)
        assert all(r["max_over_mean"] == pytest.approx(1.0) for r in rep.values())
    assert head_weights(budgets) == pytest.approx([0.9] * 4)


def test_optimal_heads_every_worker_busy():
    p = optimal_heads(5, [7, 9, 11], [5.0, 0.1, 0.1, 0.1, 0.1])
    assert all(p[w] for w in (7, 9, 11)) and sorted(h for hs in p.values() for h in hs) == list(range(5))
