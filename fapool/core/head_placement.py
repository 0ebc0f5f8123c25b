"""Which attention worker holds which KV heads in head-parallel mode (seed 004 head-level
parallelism). A policy maps KV heads to workers; the default splits them contiguously by
count. Pass per-head weights (e.g. sparse-attention budgets, seed 003) to balance work
instead of head count."""

from __future__ import annotations

from collections.abc import Callable, Sequence

HeadPlacementPolicy = Callable[[int, Sequence[int], Sequence[float] | None], dict[int, list[int]]]


def contiguous_heads(num_kv_heads: int, workers: Sequence[int], weights: Sequence[float] | None = None) -> dict[int, list[int]]:
    """Heads split into len(workers) contiguous, nearly equal runs (weights ignored)."""
    n = len(workers)
    if n == 0 or num_kv_heads < n:
        raise ValueError(f"head-parallel attention needs at least one KV head per worker ({num_kv_heads} heads, {n} workers)")
    return {w: list(range(num_kv_heads * i // n, num_kv_heads * (i + 1) // n)) for i, w in enumerate(workers)}


def lpt_heads(num_kv_heads: int, workers: Sequence[int], weights: Sequence[float] | None = None) -> dict[int, list[int]]:
    """Longest-processing-time-first: heaviest head to the least loaded worker."""
    weights = list(weights) if weights is not None else [1.0] * num_kv_heads
    if len(weights) != num_kv_heads:
        raise ValueError(f"got {len(weights)} head weights for {num_kv_heads} KV heads")
    if len(workers) == 0 or num_kv_heads < len(workers):
        raise ValueError("head-parallel attention needs at least one KV head per worker")
    load = {w: 0.0 for w in workers}
    out: dict[int, list[int]] = {w: [] for w in workers}
    for h in sorted(range(num_kv_heads), key=lambda h: (-weights[h], h)):
        w = min(workers, key=lambda w: (load[w], len(out[w]), w))
        out[w].append(h)
        load[w] += weights[h]
    return {w: sorted(hs) for w, hs in out.items()}


HEAD_POLICIES: dict[str, HeadPlacementPolicy] = {"contiguous": contiguous_heads, "lpt": lpt_heads}
