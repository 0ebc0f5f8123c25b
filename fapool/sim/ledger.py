"""KV bookkeeping: where each slot's cached tokens live (GroupLedger: its attention group; PoolLedger:
the base, then the engine's own PoolManager), and which domain overflows when a step does not fit.
"""

from __future__ import annotations

import math

import numpy as np

from fapool.config import PoolConfig
from fapool.core.pool_manager import PoolManager

Domain = tuple[str, int]  # ("group", g) | ("base", 0) | ("pool", w)
# Blocks a worker gets when the block size can be chosen (BlockPool keeps an object per block).
MAX_BLOCKS_PER_WORKER = 1 << 13


class GroupLedger:
    def __init__(self, capacity: int, num_groups: int, group_of_slot: np.ndarray):
        self.capacity = capacity  # tokens per group
        self.num_groups, self.group = num_groups, group_of_slot

    def usage(self, tokens: np.ndarray) -> np.ndarray:
        return np.bincount(self.group, weights=tokens, minlength=self.num_groups)

    # A round of admissions: usage of the tokens held or promised is cached, then O(1) a request.
    def begin_admission(self, committed: np.ndarray) -> None:
        self.used = self.usage(committed)  # per group (the simulator admits to the least used)

    def can_admit(self, group: int, tokens: int) -> bool:
        return self.used[group] + tokens <= self.capacity

    def admit(self, slot: int, group: int, now: int, later: int) -> bool:
        """Reserve a new request's tokens: `now` placed at once (prefilled), `later` promised."""
        self.used[group] += now + later
        return True

    def try_allocate(self, ctx: np.ndarray, new: np.ndarray) -> Domain | None:
        over = self.usage(ctx + new) - self.capacity
        return None if over.max(initial=0) <= 0 else ("group", int(over.argmax()))

    def holds(self, domain: Domain) -> np.ndarray:
        return self.group == domain[1]

    def free(self, slot: int) -> None:
        pass


class PoolLedger:
    def __init__(self, num_slots: int, base_capacity: int, worker_capacity: float, num_workers: int,
                 threshold: int, tokens_per_worker: int, mode: str, head_share: np.ndarray | None = None,
                 max_slot_tokens: int | None = None):
        self.base_capacity, self.mode, self.num_workers = base_capacity, mode, num_workers
        # head: every worker holds its heads of every pool token, so the fullest share binds.
        per_worker = worker_capacity / float(head_share.max()) if mode == "head" else worker_capacity
        # `max_slot_tokens`: the most a slot will ever hold (pricing one step needs no more).
        need = per_worker if max_slot_tokens is None else min(per_worker, num_slots * (max_slot_tokens + 256))
        # Blocks that divide the threshold and the segment (the engine's placement exactly), at most
        # MAX_BLOCKS_PER_WORKER a worker; else larger blocks PoolManager rounds up to while they
        # stay small beside the threshold, else the divisor with more blocks.
        least = max(16, math.ceil(need / MAX_BLOCKS_PER_WORKER))
        g = math.gcd(threshold, min(tokens_per_worker, 1 << 20))
        exact = next((d for d in range(least, min(g, 64 * least) + 1) if g % d == 0), None)
        if exact is None and g and least * 8 > g:
            exact = max(d for d in range(1, min(g, 256) + 1) if g % d == 0)
        self.block_size = exact or least
        self.pm = None
        if num_workers:
            config = PoolConfig(attention_workers=num_workers, pool_threshold=threshold,
                                tokens_per_pool_worker=tokens_per_worker, pool_mode=mode)
            self.pm = PoolManager(config, self.block_size, max(1, int(need) // self.block_size))
        self.pool_start = threshold if self.pm is None else self.pm.pool_start
        self.owned = np.zeros((num_slots, num_workers), np.int64)  # pool tokens per slot and worker
        self.room = np.full(num_slots, self.pool_start, np.int64)  # end of the slot's pool blocks
        # Positions counted in `owned` (a failed or look-ahead step may place past the context).
        self.counted = np.full(num_slots, self.pool_start, np.int64)
        self.last = np.zeros(num_slots, np.int64)  # shard: the worker of the slot's open segment
        self.placed = np.zeros(num_workers)  # tokens placed on each worker by the last allocation
        self._placing = np.zeros(num_workers)  # placed by calls since the last that succeeded

    def base_usage(self, tokens: np.ndarray) -> float:
        return float(np.minimum(tokens, self.pool_start).sum())

    def begin_admission(self, committed: np.ndarray) -> None:
        self._base_used = self.base_usage(committed)
        promised = float(np.maximum(committed - self.pool_start, 0).sum())
        # Pool tokens per slot: outside shard mode every worker holds (its share of) each token.
        held = self.owned.sum(axis=1) if self.mode == "shard" else self.owned.max(axis=1)
        self._pending_pool = promised - float(held.sum())

    def can_admit(self, group: int, tokens: int) -> bool:
        if self._base_used + min(tokens, self.pool_start) > self.base_capacity:
            return False
        free = [p.num_free_blocks * self.block_size for p in self.pm.pools.values()] if self.pm else [0]
        room = float(sum(free) if self.mode == "shard" else min(free))
        return room - self._pending_pool >= max(0, tokens - self.pool_start)

    def admit(self, slot: int, group: int, now: int, later: int) -> bool:
        if now:
            new = np.zeros(len(self.room), np.int64)
            new[slot] = now
            if self.try_allocate(np.zeros(len(self.room), np.int64), new) is not None:
                self.free(slot)
                return False
        total = now + later
        self._base_used += min(total, self.pool_start)
        self._pending_pool += max(0, total - self.pool_start) - max(0, now - self.pool_start)
        return True

    def holds(self, domain: Domain) -> np.ndarray:
        return np.ones(len(self.room), bool) if domain[0] == "base" else self.owned[:, domain[1]] > 0

    def attend(self, slots: np.ndarray, micro_batch: int = 0) -> np.ndarray:
        """[len(slots), workers]: the pool tokens each worker attends to; replicate mode routes position i
        to holder (micro_batch + i) % workers, as step_plan does."""
        rows = self.owned[slots]
        if self.mode != "replicate" or self.num_workers == 0:
            return rows
        out = np.zeros_like(rows)
        at = np.arange(len(slots))
        pick = (micro_batch + at) % self.num_workers
        out[at, pick] = rows[at, pick]
        return out

    def try_allocate(self, ctx: np.ndarray, new: np.ndarray) -> Domain | None:
        end = ctx + new
        if self.base_usage(end) > self.base_capacity:
            return ("base", 0)
        before = self.owned.sum(axis=0)
        grow = np.flatnonzero(end > self.counted)
        if len(grow) == 0:
            self._placed_by(before)
            return None
        if self.pm is None:
            return ("base", 0)
        inside = grow[end[grow] <= self.room[grow]]  # within blocks the slot already has
        add = end[inside] - self.counted[inside]
        if self.mode == "shard":
            np.add.at(self.owned, (inside, self.last[inside]), add)
        else:
            self.owned[inside] += add[:, None]
        self.counted[inside] = end[inside]
        for s in grow[end[grow] > self.room[grow]]:
            if not self.pm.allocate(str(s), int(end[s])):
                free = {w: p.num_free_blocks for w, p in self.pm.pools.items()}
                self._placing += self.owned.sum(axis=0) - before  # written by the step once it runs
                return ("pool", min(free, key=free.get) - 1)
            self._recount(int(s), int(end[s]))
        self._placed_by(before)
        return None

    def _placed_by(self, before: np.ndarray) -> None:
        """A successful allocation: `placed` is what it and the failed tries before it placed."""
        self.placed = self._placing + (self.owned.sum(axis=0) - before)
        self._placing = np.zeros(self.num_workers)

    def _recount(self, slot: int, end: int) -> None:
        """The slot's pool tokens per worker and its room, from the PoolManager's segments."""
        row = np.zeros(self.num_workers, np.int64)
        segs = self.pm.segments_of(str(slot))
        for seg in segs:
            n = max(0, min(end, seg.start + seg.num_blocks * self.block_size) - seg.start)
            for holder in seg.holders:
                row[holder.worker - 1] += n
        self.owned[slot] = row
        self.counted[slot] = end
        if segs:
            self.room[slot] = segs[-1].start + segs[-1].num_blocks * self.block_size
            self.last[slot] = segs[-1].holders[0].worker - 1

    def free(self, slot: int) -> None:
        if self.pm is not None:
            self.pm.free(str(slot))
        self.owned[slot] = 0
        self.room[slot] = self.counted[slot] = self.pool_start
