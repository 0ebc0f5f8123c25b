"""Checks a run's point-to-point trace (fapool.worker.comm.TRACE_ENV) for what NCCL needs:
NCCL ignores message tags and runs the sends and receives between two ranks in posting order
on one stream, so for every pair the k-th post on one side must be the receive (send) of the
k-th send (receive) on the other, of the same size. gloo matches by tag and forgives any other
order, so the CPU tests catch here what would deadlock or garble on GPUs."""

from __future__ import annotations

import os
from collections import defaultdict


def read_trace(folder: str) -> dict[int, list[tuple[str, int, int, str]]]:
    """rank -> [(op, peer, numel, dtype)] in posting order."""
    out = {}
    for name in os.listdir(folder):
        rank = int(name.removeprefix("rank").removesuffix(".txt"))
        with open(os.path.join(folder, name)) as f:
            out[rank] = [(op, int(peer), int(n), dt) for op, peer, n, dt in (line.split() for line in f)]
    return out


def assert_pairs_mirror(folder: str, world_size: int) -> int:
    """Every pair's posts mirror each other; returns the number of messages checked."""
    trace = read_trace(folder)
    assert set(trace) == set(range(world_size)), f"trace from ranks {sorted(trace)}"
    per_pair: dict[tuple[int, int], list] = defaultdict(list)
    for rank, posts in trace.items():
        for op, peer, n, dt in posts:
            per_pair[rank, peer].append((op, n, dt))
    checked = 0
    for (a, b), mine in per_pair.items():
        if a > b:
            continue
        theirs = per_pair.get((b, a), [])
        assert len(mine) == len(theirs), f"ranks {a} and {b} post {len(mine)} vs {len(theirs)} transfers"
        for k, ((op, n, dt), (op2, n2, dt2)) in enumerate(zip(mine, theirs)):
            assert {op, op2} == {"send", "recv"} and (n, dt) == (n2, dt2), (
                f"ranks {a}/{b}, transfer {k}: {op} {n} {dt} on {a} meets {op2} {n2} {dt2} on {b}"
            )
        checked += len(mine)
    return checked
