"""Turn a micro-batch and its requests' KV placement into work: the local attention metadata
and, for each attention worker, which query rows and which new K/V rows it gets.

The same plan serves every layer of the step (placement does not change within a step).
What a worker receives (WorkerBatch) is plain data; the driver keeps the row indices
(Route) to cut the messages out of q/k/v and to scatter the answers back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fapool.attention.metadata import AttentionMetadata
from fapool.core.scheduler import ScheduledRequest


@dataclass
class Entry:
    """Attention of some of a sequence's queries over one contiguous range of its KV."""

    num_queries: int
    query_pos_start: int
    kv_start: int
    kv_len: int
    block_ids: list[int]


@dataclass
class WorkerBatch:
    """One worker's share of one micro-batch, identical for every layer."""

    entries: list[Entry] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)  # slot of each new K/V row, in row order

    @property
    def num_q_rows(self) -> int:
        return sum(e.num_queries for e in self.entries)

    def metadata(self, device: torch.device | str) -> tuple[AttentionMetadata, torch.Tensor]:
        meta = AttentionMetadata.build(
            query_lens=[e.num_queries for e in self.entries],
            query_pos_start=[e.query_pos_start for e in self.entries],
            kv_lens=[e.kv_len for e in self.entries],
            block_tables=[e.block_ids for e in self.entries],
            slot_mapping=[-1] * self.num_q_rows,  # K/V rows are written separately
            kv_start=[e.kv_start for e in self.entries],
            device=device,
        )
        return meta, torch.tensor(self.kv_slots, dtype=torch.int64, device=device)


@dataclass
class Route:
    """Driver-side bookkeeping for one worker in one micro-batch."""

    worker: int
    batch: WorkerBatch
    q_rows: list[int] = field(default_factory=list)  # token index of each query row
    kv_rows: list[int] = field(default_factory=list)  # token index of each new K/V row
    rounds: list[list[int]] = field(default_factory=list)  # row groups whose tokens are unique


@dataclass
class MicroBatchPlan:
    scheduled: list[ScheduledRequest]
    input_ids: list[int]
    positions: list[int]
    local_meta_args: dict
    routes: dict[int, Route]  # worker id -> route (workers with work only)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def plan_micro_batch(
    scheduled: list[ScheduledRequest], block_size: int, pool_start: int, mode: str, batch_index: int = 0
) -> MicroBatchPlan:
    ids: list[int] = []
    positions: list[int] = []
    local_slots: list[int] = []
    local = {"query_lens": [], "query_pos_start": [], "kv_lens": [], "block_tables": []}
    routes: dict[int, Route] = {}
    entry_count: dict[tuple[int, str], int] = {}

    def route(w: int) -> Route:
        return routes.setdefault(w, Route(w, WorkerBatch()))

    def add_entry(w: int, rid: str, entry: Entry, first_token: int) -> None:
        r = route(w)
        rnd = entry_count.get((w, rid), 0)
        entry_count[(w, rid)] = rnd + 1
        while len(r.rounds) <= rnd:
            r.rounds.append([])
        start = len(r.q_rows)
        r.q_rows.extend(range(first_token, first_token + entry.num_queries))
        r.rounds[rnd].extend(range(start, start + entry.num_queries))
        r.batch.entries.append(entry)

    offset = 0
    for i, s in enumerate(scheduled):
        c, n = s.num_computed_tokens, s.num_new_tokens
        end = c + n
        ids += s.request.all_token_ids[c:end]
        positions += range(c, end)
        local_len = min(end, pool_start) if s.segments else end
        for p in range(c, end):
            local_slots.append(s.block_ids[p // block_size] * block_size + p % block_size if p < local_len else -1)
        local["query_lens"].append(n)
        local["query_pos_start"].append(c)
        local["kv_lens"].append(local_len)
        local["block_tables"].append(s.block_ids)

        for seg in s.segments:
            seg_end = min(seg.start + seg.num_blocks * block_size, end)
            j0 = max(0, seg.start - c)  # queries before the segment cannot see it
            num_q = n - j0
            if seg_end <= seg.start or num_q <= 0:
                continue
            new_lo, new_hi = max(c, seg.start), seg_end  # this step's tokens stored here
            if mode == "replicate":
                # The seed's scheme: every placement holds the whole range; queries are split.
                m = len(seg.placements)
                if num_q == 1:
                    parts = {(batch_index + i) % m: (j0, n)}
                else:
                    bounds = [j0 + num_q * k // m for k in range(m + 1)]
                    parts = {k: (bounds[k], bounds[k + 1]) for k in range(m) if bounds[k + 1] > bounds[k]}
            else:
                parts = {k: (j0, n) for k in range(len(seg.placements))}
            for k, placement in enumerate(seg.placements):
                r = route(placement.worker)
                for p in range(new_lo, new_hi):
                    rel = p - seg.start
                    r.batch.kv_slots.append(placement.block_ids[rel // block_size] * block_size + rel % block_size)
                    r.kv_rows.append(offset + p - c)
                if k in parts:
                    a, b = parts[k]
                    entry = Entry(b - a, c + a, seg.start, seg_end - seg.start, placement.block_ids)
                    add_entry(placement.worker, s.request.request_id, entry, offset + a)
        offset += n

    local["slot_mapping"] = local_slots
    return MicroBatchPlan(scheduled, ids, positions, local, routes)


def split_micro_batches(scheduled: list[ScheduledRequest], count: int) -> list[list[ScheduledRequest]]:
    """Contiguous groups with about the same number of tokens (order kept)."""
    count = max(1, min(count, len(scheduled)))
    if count == 1:
        return [scheduled]
    total = sum(s.num_new_tokens for s in scheduled)
    groups: list[list[ScheduledRequest]] = [[]]
    acc = 0
    for s in scheduled:
        if groups[-1] and acc >= total * len(groups) / count and len(groups) < count:
            groups.append([])
        groups[-1].append(s)
        acc += s.num_new_tokens
    return [g for g in groups if g]
