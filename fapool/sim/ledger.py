"""KV bookkeeping for the simulator: where each slot's cached tokens live, and when a step's
new tokens do not fit (which triggers preemption).

Two ledgers:
  GroupLedger  every slot's KV lives in its attention group (static TP x PP: one group;
               AFD: one group per attention GPU). Usage is derived from the slots' contexts.
  PoolLedger   FA Pool / head-parallel: the first `threshold` tokens of a sequence stay on the
               base GPUs; later tokens go to pool workers in chunks of `tokens_per_worker`
               (placement 'spread': a least-loaded worker the sequence does not use yet;
               'pack': the lowest-numbered worker with room) or, for 'head', every pool token
               is split over all workers by KV head.

A ledger's `try_allocate` is transactional: it either places all of a step's new tokens and
returns None, or changes nothing and returns the domain that overflowed, so the simulator can
preempt the youngest request there and try again.
"""

from __future__ import annotations

import numpy as np

Domain = tuple[str, int]  # ("group", g) | ("base", 0) | ("pool", w)


class GroupLedger:
    def __init__(self, capacity: int, num_groups: int, group_of_slot: np.ndarray):
        self.capacity = capacity  # tokens per group
        self.num_groups = num_groups
        self.group = group_of_slot

    def usage(self, tokens: np.ndarray) -> np.ndarray:
        return np.bincount(self.group, weights=tokens, minlength=self.num_groups)

    # Admission: `begin_admission` caches usage for a round of admissions; `can_admit` and
    # `admit` then cost O(1) each. `committed` = per-slot tokens held or promised (prefill).
    def begin_admission(self, committed: np.ndarray) -> None:
        self._used = self.usage(committed)

    def group_usage(self) -> np.ndarray:
        return self._used

    def can_admit(self, group: int, tokens: int) -> bool:
        return self._used[group] + tokens <= self.capacity

    def admit(self, slot: int, group: int, now: int, later: int) -> bool:
        """Reserve a new request's tokens: `now` placed at once (prefilled), `later` promised."""
        self._used[group] += now + later
        return True

    def try_allocate(self, ctx: np.ndarray, new: np.ndarray) -> Domain | None:
        over = self.usage(ctx + new) - self.capacity
        if over.max(initial=0) <= 0:
            return None
        return ("group", int(over.argmax()))

    def holds(self, domain: Domain) -> np.ndarray:
        return self.group == domain[1]

    def free(self, slot: int) -> None:
        pass


class PoolLedger:
    def __init__(
        self,
        num_slots: int,
        base_capacity: int,
        worker_capacity: float,
        num_workers: int,
        threshold: int,
        tokens_per_worker: int,
        placement: str,
        head_share: np.ndarray | None = None,
    ):
        self.base_capacity = base_capacity
        self.threshold = threshold
        self.tpw = tokens_per_worker
        self.placement = placement
        self.num_workers = num_workers
        # head placement: worker w holds head_share[w] of every pool token's KV, so its
        # capacity in whole-token units is worker_capacity / head_share[w].
        self.head_share = head_share
        if placement == "head":
            self.capacity = worker_capacity / np.maximum(head_share, 1e-12)
        else:
            self.capacity = np.full(num_workers, float(worker_capacity))
        self.load = np.zeros(num_workers)  # tokens (head: whole-token units of the pool part)
        self.owned = np.zeros((num_slots, num_workers), np.int64)  # spread/pack only
        self.cur = np.full(num_slots, -1, np.int64)  # worker taking the slot's next pool token
        self.fill = np.zeros(num_slots, np.int64)  # tokens in the slot's current chunk
        self.placed = np.zeros(num_workers)  # tokens placed on each worker by the last allocation
        self.pool_tokens = np.zeros(num_slots, np.int64)  # head placement: pool part per slot

    # -- queries -----------------------------------------------------------------------
    def base_usage(self, tokens: np.ndarray) -> float:
        return float(np.minimum(tokens, self.threshold).sum())

    def begin_admission(self, committed: np.ndarray) -> None:
        self._base_used = self.base_usage(committed)
        self._pending_pool = float(np.maximum(committed - self.threshold, 0).sum()) - self.load_tokens()

    def group_usage(self) -> np.ndarray:
        return np.array([self._base_used])

    def can_admit(self, group: int, tokens: int) -> bool:
        if self._base_used + min(tokens, self.threshold) > self.base_capacity:
            return False
        return self.free_pool_tokens() - self._pending_pool >= max(0, tokens - self.threshold)

    def admit(self, slot: int, group: int, now: int, later: int) -> bool:
        if now:
            new = np.zeros(len(self.cur), np.int64)
            new[slot] = now
            if self.try_allocate(np.zeros(len(self.cur), np.int64), new) is not None:
                return False
        total = now + later
        self._base_used += min(total, self.threshold)
        self._pending_pool += max(0, total - self.threshold) - max(0, now - self.threshold)
        return True

    def load_tokens(self) -> float:
        return float(self.pool_tokens.sum()) if self.placement == "head" else float(self.owned.sum())

    def free_pool_tokens(self) -> float:
        if self.num_workers == 0:
            return 0.0
        if self.placement == "head":
            return float((self.capacity - self.load).min())
        return float((self.capacity - self.load).sum())

    def holds(self, domain: Domain) -> np.ndarray:
        if domain[0] == "base":
            return np.ones(len(self.cur), bool)
        if self.placement == "head":
            return self.pool_tokens > 0
        return self.owned[:, domain[1]] > 0

    # -- allocation ----------------------------------------------------------------------
    def try_allocate(self, ctx: np.ndarray, new: np.ndarray) -> Domain | None:
        if self.base_usage(ctx + new) > self.base_capacity:
            return ("base", 0)
        pool_new = np.maximum(ctx + new - self.threshold, 0) - np.maximum(ctx - self.threshold, 0)
        slots = np.flatnonzero(pool_new)
        self.placed = np.zeros(self.num_workers)
        if len(slots) == 0:
            return None
        if self.num_workers == 0:
            return ("base", 0)
        if self.placement == "head":
            add = pool_new.sum() * np.ones(self.num_workers)
            if np.any(self.load + add > self.capacity + 1e-9):
                return ("pool", int(np.argmax(self.load + add - self.capacity)))
            self.load += add
            self.pool_tokens += pool_new
            self.placed = add
            return None
        load, owned, cur, fill = self.load.copy(), self.owned.copy(), self.cur.copy(), self.fill.copy()
        # Fast path: one token into an open chunk (most decode steps).
        easy = (pool_new[slots] == 1) & (cur[slots] >= 0) & (fill[slots] < self.tpw)
        es = slots[easy]
        if len(es):
            w = cur[es]
            load += np.bincount(w, minlength=self.num_workers)
            owned[es, w] += 1
            fill[es] += 1
            if np.any(load > self.capacity):
                return ("pool", int(np.argmax(load - self.capacity)))
        for s in slots[~easy]:
            remaining = int(pool_new[s])
            while remaining:
                if cur[s] < 0 or fill[s] >= self.tpw:
                    w = self._pick(load, owned[s])
                    if w < 0:
                        return ("pool", int(np.argmax(load - self.capacity)))
                    cur[s], fill[s] = w, 0
                w = int(cur[s])
                take = int(min(remaining, self.tpw - fill[s], self.capacity[w] - load[w]))
                if take <= 0:
                    fill[s] = self.tpw  # worker full: close the chunk, pick another
                    continue
                load[w] += take
                owned[s, w] += take
                fill[s] += take
                remaining -= take
        self.placed = load - self.load
        self.load, self.owned, self.cur, self.fill = load, owned, cur, fill
        return None

    def _pick(self, load: np.ndarray, owned_row: np.ndarray) -> int:
        room = self.capacity - load >= 1
        if not room.any():
            return -1
        if self.placement == "pack":
            return int(np.flatnonzero(room)[0])
        unused = room & (owned_row == 0)
        cand = unused if unused.any() else room
        masked = np.where(cand, load, np.inf)
        return int(np.argmin(masked))

    def free(self, slot: int) -> None:
        if self.placement == "head":
            self.load -= self.pool_tokens[slot]
            self.pool_tokens[slot] = 0
        else:
            self.load -= self.owned[slot]
            self.owned[slot] = 0
        np.maximum(self.load, 0, out=self.load)
        self.cur[slot] = -1
        self.fill[slot] = 0
