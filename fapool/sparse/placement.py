"""Sparsity-aware head placement (S-HPLB): budgets as work, balanced across attention workers.

In head-parallel attention every layer ends in a barrier: a layer's attention takes as long
as its most loaded worker. With head-adaptive budgets a head's work is proportional to its
budget (blocks read), so placing heads by count leaves bubbles on the lightly loaded workers.

    head_weights(profile)           per-KV-head work summed over layers: the weights the
                                    placement hook (fapool.core.head_placement) takes when one
                                    placement serves every layer
    optimal_heads(...)              the exact min-max placement by exhaustive search (small cases)
    layer_loads / balance_report    per-layer max and mean worker load for a placement
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from fapool.core.head_placement import contiguous_heads, lpt_heads


def head_weights(kv_budget: Sequence[Sequence[float]]) -> list[float]:
    """[layer][kv_head] budgets -> per-KV-head work over all layers."""
    return [sum(layer[h] for layer in kv_budget) for h in range(len(kv_budget[0]))]


def optimal_heads(num_heads: int, workers: Sequence[int], weights: Sequence[float]) -> dict[int, list[int]]:
    """The placement minimising the largest worker load (every worker gets a head), by
    exhaustive search over assignments, heaviest heads first with symmetric workers pruned.
    Exponential: for checking heuristics on small cases (<= ~12 heads)."""
    if num_heads > 16:
        raise ValueError("optimal_heads is exhaustive; use it on at most 16 heads")
    n_w = len(workers)
    if n_w == 0 or num_heads < n_w:
        raise ValueError("head-parallel attention needs at least one KV head per worker")
    order = sorted(range(num_heads), key=lambda h: -weights[h])
    best = [float("inf"), None]
    loads = [0.0] * n_w
    counts = [0] * n_w
    assign = [0] * num_heads

    def search(i: int) -> None:
        if max(loads) >= best[0]:
            return
        if i == num_heads:
            if min(counts) > 0:
                best[0], best[1] = max(loads), list(assign)
            return
        if sum(1 for c in counts if c == 0) > num_heads - i:
            return
        seen = set()
        for w in range(n_w):
            key = (loads[w], counts[w])
            if key in seen:  # an identical worker state: same subtree
                continue
            seen.add(key)
            h = order[i]
            loads[w] += weights[h]
            counts[w] += 1
            assign[h] = w
            search(i + 1)
            loads[w] -= weights[h]
            counts[w] -= 1

    search(0)
    out: dict[int, list[int]] = {w: [] for w in workers}
    for h, w in enumerate(best[1]):
        out[workers[w]].append(h)
    return out


def layer_loads(placement: dict[int, list[int]], weights: Sequence[float]) -> list[float]:
    return [sum(weights[h] for h in heads) for heads in placement.values()]


Policy = Callable[[int, Sequence[int], Sequence[float] | None], dict[int, list[int]]]
POLICIES: dict[str, Policy] = {"contiguous": contiguous_heads, "lpt": lpt_heads, "optimal": optimal_heads}


def balance_report(budgets: Sequence[Sequence[float]], num_workers: int, per_layer: bool) -> dict[str, dict]:
    """budgets [layer][head] (work per head) on `num_workers` workers -> for each policy:
    time = sum over layers of the most loaded worker, ideal = sum of mean loads, and
    max_over_mean = time / ideal (1.0 = no bubbles). per_layer: each layer placed on its own
    (a worker holds different heads in different layers); else one placement for all layers,
    chosen on the summed weights (what the placement hook does)."""
    workers = list(range(num_workers))
    num_heads = len(budgets[0])
    ideal = sum(sum(layer) / num_workers for layer in budgets)
    report = {}
    for name, policy in POLICIES.items():
        if name == "optimal" and num_heads > 12:
            continue
        if per_layer:
            time = sum(max(layer_loads(policy(num_heads, workers, layer), layer)) for layer in budgets)
        else:
            placement = policy(num_heads, workers, head_weights(budgets))
            time = sum(max(layer_loads(placement, layer)) for layer in budgets)
        report[name] = {
            "time": round(time, 4),
            "ideal": round(ideal, 4),
            "max_over_mean": round(time / ideal, 4),
        }
    return report


def brute_force_check(
    num_heads: int, num_workers: int, weights: Sequence[float]
) -> tuple[float, float, float]:
    """(contiguous, lpt, optimal) max loads of one case, the optimum by plain enumeration of
    all num_workers ** num_heads assignments (independent of optimal_heads' pruning)."""
    workers = list(range(num_workers))
    best = float("inf")
    for assign in itertools.product(workers, repeat=num_heads):
        if len(set(assign)) < num_workers:
            continue
        loads = [0.0] * num_workers
        for h, w in enumerate(assign):
            loads[w] += weights[h]
        best = min(best, max(loads))
    cont = max(layer_loads(contiguous_heads(num_heads, workers), weights))
    lpt = max(layer_loads(lpt_heads(num_heads, workers, weights), weights))
    return cont, lpt, best
