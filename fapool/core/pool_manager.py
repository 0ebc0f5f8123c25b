"""The resource manager of the attention pool (seed 000): where a sequence's KV blocks live.

A sequence's first `pool_threshold` tokens (rounded up to whole blocks) stay on the local
(dense) worker. Past that, its KV goes to attention workers, in *segments* of
`tokens_per_pool_worker` tokens:

    positions: | local: 0 .. P0 | segment 0 | segment 1 | segment 2 | ...
    shard:       dense worker     worker a    worker b    worker a      (one worker each)
    replicate:   dense worker     every pool worker holds the whole pool region
    head:        dense worker     every pool worker holds its KV heads of the pool region

In shard mode each new segment goes to a worker not yet serving the sequence while it has
fewer than `attention_workers` (the pool serving it grows with its length), then to the
least loaded of its workers. Workers are chosen by fewest used blocks, so KV tokens stay
balanced across the pool. Everything is released when the sequence finishes. No tensors
here: the model runner turns segments into messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fapool.config import PoolConfig
from fapool.core.block_pool import BlockPool, KVBlock


@dataclass
class SegmentBlocks:
    worker: int  # pool worker id, 1..attention_workers (0 is the local worker)
    blocks: list[KVBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # kept in step with blocks: no per-step rebuild

    def add(self, blocks: list[KVBlock]) -> None:
        self.blocks.extend(blocks)
        self.block_ids.extend(b.block_id for b in blocks)

    def replace(self, idx: int, block: KVBlock) -> None:
        self.blocks[idx] = block
        self.block_ids[idx] = block.block_id

    def copy(self) -> SegmentBlocks:
        return SegmentBlocks(self.worker, list(self.blocks), list(self.block_ids))


@dataclass
class Segment:
    start: int  # absolute position of the segment's first token (block aligned)
    holders: list[SegmentBlocks]

    @property
    def num_blocks(self) -> int:
        return len(self.holders[0].blocks)


@dataclass(frozen=True)
class PoolEvent:
    step: int
    request_id: str
    action: str  # "grow" | "release"
    workers: tuple[int, ...]  # the request's pool workers after the event


class PoolManager:
    def __init__(self, config: PoolConfig, block_size: int, num_blocks_per_worker: int) -> None:
        self.config = config
        self.mode = config.pool_mode
        self.block_size = block_size
        self.local_blocks = -(-config.pool_threshold // block_size)
        self.pool_start = self.local_blocks * block_size  # first position stored in the pool
        self.segment_blocks = max(1, -(-config.tokens_per_pool_worker // block_size))
        self.pools = {
            w: BlockPool(num_blocks_per_worker, worker=w, enable_caching=False)
            for w in range(1, config.attention_workers + 1)
        }
        self.alive: set[int] = set(self.pools)
        self.segments: dict[str, list[Segment]] = {}
        self.assigned: dict[str, list[int]] = {}
        self.history: list[PoolEvent] = []
        self.step = 0
        self._pending_copies: list[tuple[int, int, int]] = []  # (worker, src, dst)

    # Queries ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.alive)

    def workers_of(self, request_id: str) -> list[int]:
        return list(self.assigned.get(request_id, []))

    def active_workers(self) -> set[int]:
        return {w for ws in self.assigned.values() for w in ws}

    def kv_tokens_per_worker(self) -> dict[int, int]:
        """Used blocks x block size on each pool worker (an upper bound on stored tokens)."""
        return {w: p.num_used_blocks * self.block_size for w, p in self.pools.items()}

    def workers_at(self, lengths: dict[str, int]) -> set[int]:
        """The workers the requests' KV would be on once each holds lengths[request_id] tokens,
        placed in turn as allocate() would (nothing is allocated): where an elastic pool starts
        workers ahead."""
        load = self._load()
        workers: set[int] = set()
        for rid, num_tokens in lengths.items():
            workers.update(self.assigned.get(rid, []))
            segs = self.segments.get(rid, [])
            missing = self.pool_blocks_needed(num_tokens) - sum(s.num_blocks for s in segs)
            if missing > 0:
                workers.update(w for _, ws, _ in self._plan(rid, segs, missing, load) or [] for w in ws)
        return workers

    def _load(self) -> tuple[dict[int, int], dict[int, int]]:
        """(used, free) blocks of each live worker."""
        return (
            {w: self.pools[w].num_used_blocks for w in self.alive},
            {w: self.pools[w].num_free_blocks for w in self.alive},
        )

    def pool_blocks_needed(self, num_tokens: int) -> int:
        return max(0, -(-(num_tokens - self.pool_start) // self.block_size)) if self.enabled else 0

    def can_ever_fit(self, num_tokens: int) -> bool:
        need = self.pool_blocks_needed(num_tokens)
        alive = [self.pools[w] for w in self.alive]
        if self.mode == "shard":
            return need <= sum(p.num_blocks for p in alive)
        return need <= min((p.num_blocks for p in alive), default=0)

    # Allocation ---------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, dry_run: bool = False) -> bool:
        """Ensure blocks for positions [pool_start, num_tokens). All or nothing; with
        dry_run, only report whether it would succeed."""
        need = self.pool_blocks_needed(num_tokens)
        segs = self.segments.get(request_id, [])
        have = sum(s.num_blocks for s in segs)
        if need <= have:
            return True
        plan = self._plan(request_id, segs, need - have)
        if plan is None:
            return False
        if dry_run:
            return True
        workers_before = list(self.assigned.get(request_id, []))
        segs = self.segments.setdefault(request_id, [])
        for new_segment, workers, count in plan:
            if new_segment:
                start = self.pool_start + sum(s.num_blocks for s in segs) * self.block_size
                segs.append(Segment(start, [SegmentBlocks(w) for w in workers]))
            for holder in segs[-1].holders:
                holder.add(self.pools[holder.worker].get_new_blocks(count))
        assigned = self.assigned.setdefault(request_id, [])
        for _, workers, _ in plan:
            assigned.extend(w for w in workers if w not in assigned)
        if assigned != workers_before:
            self.history.append(PoolEvent(self.step, request_id, "grow", tuple(assigned)))
        return True

    def _plan(self, request_id: str, segs: list[Segment], num_new: int, load=None):
        """[(opens_new_segment, workers, num_blocks)] covering num_new more blocks, or None
        when some worker lacks the free blocks (or holds the request's KV but is dead). `load`
        ((used, free) from _load) is read and updated in place when given: a dry run over
        several requests."""
        assigned = list(self.assigned.get(request_id, []))
        if any(w not in self.alive for w in assigned):
            return None
        used, free = load if load is not None else self._load()
        steps: list[tuple[bool, list[int], int]] = []
        if self.mode != "shard":  # one segment on every pool worker, growing in place
            workers = [p.worker for p in segs[0].holders] if segs else sorted(self.alive)
            if any(free[w] < num_new for w in workers):
                return None
            return [(not segs, workers, num_new)]
        if segs:  # fill the open segment first, while its worker has room
            w = segs[-1].holders[0].worker
            take = min(self.segment_blocks - segs[-1].num_blocks, num_new, free[w])
            if take > 0:
                steps.append((False, [w], take))
                used[w] += take
                free[w] -= take
                num_new -= take
        while num_new > 0:
            fresh = [w for w in sorted(self.alive) if w not in assigned and free[w] > 0]
            grow = fresh and len(assigned) < self.config.attention_workers
            candidates = fresh if grow else [w for w in assigned if free[w] > 0]
            if not candidates:  # its workers are full: spill to any worker with room
                candidates = [w for w in sorted(self.alive) if free[w] > 0]
            if not candidates:
                return None
            # Least loaded first; a segment smaller than usual if no worker has room for one.
            w = min(candidates, key=lambda w: (used[w], w))
            if w not in assigned:
                assigned.append(w)
            take = min(self.segment_blocks, num_new, free[w])
            steps.append((True, [w], take))
            used[w] += take
            free[w] -= take
            num_new -= take
        return steps

    def write_position_needs_copy(self, request_id: str, position: int) -> bool:
        """True when the pool block holding `position` is shared (fork) and must be copied."""
        seg, idx = self._locate(request_id, position)
        return seg is not None and any(p.blocks[idx].ref_cnt > 1 for p in seg.holders)

    def copy_on_write(self, request_id: str, position: int) -> bool:
        """Give the request private copies of the block holding `position` (all holders).
        Returns False, changing nothing, when a worker has no free block."""
        seg, idx = self._locate(request_id, position)
        if seg is None:
            return True
        shared = [p for p in seg.holders if p.blocks[idx].ref_cnt > 1]
        if any(self.pools[p.worker].num_free_blocks < 1 for p in shared):
            return False
        for p in shared:
            (fresh,) = self.pools[p.worker].get_new_blocks(1)
            self._pending_copies.append((p.worker, p.blocks[idx].block_id, fresh.block_id))
            self.pools[p.worker].free_blocks([p.blocks[idx]])
            p.replace(idx, fresh)
        return True

    def _locate(self, request_id: str, position: int) -> tuple[Segment | None, int]:
        for seg in self.segments.get(request_id, []):
            idx = (position - seg.start) // self.block_size
            if 0 <= idx < seg.num_blocks:
                return seg, idx
        return None, 0

    def fork(self, parent_id: str, child_id: str) -> None:
        segs = self.segments.get(parent_id)
        if not segs:
            return
        child = [Segment(s.start, [p.copy() for p in s.holders]) for s in segs]
        for s in child:
            for p in s.holders:
                self.pools[p.worker].touch(p.blocks)
        self.segments[child_id] = child
        self.assigned[child_id] = list(self.assigned[parent_id])
        self.history.append(PoolEvent(self.step, child_id, "grow", tuple(self.assigned[child_id])))

    def free(self, request_id: str) -> None:
        for seg in reversed(self.segments.pop(request_id, [])):
            for p in seg.holders:
                self.pools[p.worker].free_blocks(list(reversed(p.blocks)))
        workers = self.assigned.pop(request_id, None)
        if workers:
            self.history.append(PoolEvent(self.step, request_id, "release", ()))

    def mark_dead(self, worker: int) -> list[str]:
        """Stop placing on `worker`; returns the requests that had KV there."""
        self.alive.discard(worker)
        return [rid for rid, ws in self.assigned.items() if worker in ws]

    def take_pending_copies(self) -> list[tuple[int, int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def segments_of(self, request_id: str) -> list[Segment]:
        """The request's segments, live (read-only for callers): a step plan reads their block
        ids without copying, so per-step work does not grow with the context."""
        return self.segments.get(request_id, [])
