"""The one batch builder of the multi-rank runtime: a step's scheduled requests, cut into
micro-batches, become plans. A plan holds the dense side's flat token batch (ids, positions,
local attention metadata, the rows whose logits are due) and, for each attention worker, which
query rows and which new K/V rows it gets.

The same plan serves every layer of the step (placement does not change within a step). Host
work per request is proportional to its new tokens and its block table, never to its whole
token list. What a worker receives (WorkerBatch) is plain data; the driver keeps the row
indices (Route) to cut the messages out of q/k/v and to scatter the answers back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fapool.core.scheduler import ScheduledRequest
from fapool.request import Request
from fapool.worker.protocol import Entry, MicroBatch, Route, WorkerBatch


@dataclass
class MicroBatchPlan:
    scheduled: list[ScheduledRequest]
    input_ids: list[int]
    positions: list[int]
    local_meta_args: dict
    routes: dict[int, Route]  # worker id -> route (workers with work only)
    logit_rows: list[int]  # rows whose next token is due, in order
    # (row, request) whose input token the step in flight is still sampling (async
    # scheduling): input_ids holds 0 there until the runner fills it on the device.
    placeholders: list[tuple[int, Request]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def dense(self, with_routes: bool = False) -> MicroBatch:
        """What a dense rank runs: the tokens with the local metadata (pool rows have slot -1
        and lie past the local kv_lens). `with_routes`: the rank exchanges with the attention
        ranks itself (a pipeline stage), so it gets the rows to cut (not the workers' plans)."""
        routes = None
        if with_routes:
            routes = {w: Route(w, WorkerBatch(), r.q_rows, r.kv_rows, r.rounds) for w, r in self.routes.items()}
        return MicroBatch(
            self.input_ids,
            self.positions,
            self.local_meta_args,
            self.logit_rows,
            remote=bool(self.routes),
            routes=routes,
        )


def slots_of(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions [start, end) in a request's blocks (numpy for long runs:
    a 16K-token prefill chunk would otherwise spend milliseconds in this loop)."""
    if end - start <= 64:
        return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
    pos = np.arange(start, end)
    first = start // block_size
    blocks = np.asarray(block_ids[first : -(-end // block_size)], dtype=np.int64)
    return (blocks[pos // block_size - first] * block_size + pos % block_size).tolist()


def plan_micro_batch(
    scheduled: list[ScheduledRequest],
    block_size: int,
    pool_start: int | None = None,
    mode: str = "shard",
    batch_index: int = 0,
) -> MicroBatchPlan:
    """`pool_start`: the first position stored in the pool (None: no pool, all KV local)."""
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

    logit_rows: list[int] = []
    placeholders: list[tuple[int, Request]] = []
    offset = 0
    for i, s in enumerate(scheduled):
        c, n = s.num_computed_tokens, s.num_new_tokens
        end = c + n
        known = min(end, s.request.num_tokens)
        ids += s.request.token_slice(c, known)
        if known < end:  # its last token is the one the step in flight samples
            placeholders.append((len(ids), s.request))
            ids.append(0)
        positions += range(c, end)
        if s.completes_known_tokens:
            logit_rows.append(offset + n - 1)
        local_len = min(end, pool_start) if s.segments and pool_start is not None else end
        local_slots += slots_of(s.block_ids, c, max(c, local_len), block_size)
        local_slots += [-1] * (end - max(c, local_len))
        local["query_lens"].append(n)
        local["query_pos_start"].append(c)
        local["kv_lens"].append(local_len)
        # Copies of the blocks this step reads: the manager's lists grow while a launched step
        # is still being planned on (async scheduling builds the next step meanwhile).
        local["block_tables"].append(s.block_ids[: -(-local_len // block_size)])

        for seg in s.segments:
            seg_end = min(seg.start + seg.num_blocks * block_size, end)
            j0 = max(0, seg.start - c)  # queries before the segment cannot see it
            num_q = n - j0
            if seg_end <= seg.start or num_q <= 0:
                continue
            new_lo, new_hi = max(c, seg.start), seg_end  # this step's tokens stored here
            if mode == "replicate":
                # The seed's scheme: every holder holds the whole range; queries are split.
                m = len(seg.holders)
                if num_q == 1:
                    parts = {(batch_index + i) % m: (j0, n)}
                else:
                    bounds = [j0 + num_q * k // m for k in range(m + 1)]
                    parts = {k: (bounds[k], bounds[k + 1]) for k in range(m) if bounds[k + 1] > bounds[k]}
            else:
                parts = {k: (j0, n) for k in range(len(seg.holders))}
            for k, holder in enumerate(seg.holders):
                r = route(holder.worker)
                r.batch.kv_slots += slots_of(holder.block_ids, new_lo - seg.start, new_hi - seg.start, block_size)
                r.kv_rows += range(offset + new_lo - c, offset + new_hi - c)
                if k in parts:
                    a, b = parts[k]
                    span = seg_end - seg.start
                    entry = Entry(b - a, c + a, seg.start, span, holder.block_ids[: -(-span // block_size)])
                    add_entry(holder.worker, s.request.request_id, entry, offset + a)
        offset += n

    local["slot_mapping"] = local_slots
    return MicroBatchPlan(scheduled, ids, positions, local, routes, logit_rows, placeholders)


def split_micro_batches(scheduled: list[ScheduledRequest], count: int) -> list[list[ScheduledRequest]]:
    """`count` contiguous groups (fewer only with fewer requests) with about the same number
    of tokens, order kept: a group ends once it reaches its share, or when the requests left
    are just enough to give each remaining group one."""
    count = max(1, min(count, len(scheduled)))
    if count == 1:
        return [scheduled]
    total = sum(s.num_new_tokens for s in scheduled)
    groups: list[list[ScheduledRequest]] = [[]]
    acc = 0
    for i, s in enumerate(scheduled):
        to_open = count - len(groups)
        if groups[-1] and to_open > 0 and (acc >= total * len(groups) / count or len(scheduled) - i <= to_open):
            groups.append([])
        groups[-1].append(s)
        acc += s.num_new_tokens
    return groups


class MicroBatchPolicy:
    """How many micro-batches a step is cut into, from measured step times.

    Two micro-batches let one's remote attention run beside the other's dense work, but each
    reads every weight again, so at small batches they can cost more than they hide. With no
    fixed count, each shape bucket (sequences, tokens and longest context, in powers of two)
    tries every count up to `max_count` `probes` times, then takes the fastest (the best of its
    recent steps: a one-off slow step, a kernel compiling or a busy machine, must not decide)
    and tries the others again every `retry` steps, so that a changed cost is noticed."""

    def __init__(
        self, fixed: int | None = None, max_count: int = 2, probes: int = 2, retry: int = 64, window: int = 5
    ) -> None:
        self.fixed = fixed
        self.candidates = list(range(1, max_count + 1))
        self.probes = probes
        self.retry = retry
        self.window = window
        self._times: dict[tuple, dict[int, list[float]]] = {}
        self._steps: dict[tuple, int] = {}

    @staticmethod
    def bucket(num_seqs: int, num_tokens: int, max_context: int) -> tuple[int, int, int]:
        return num_seqs, num_tokens.bit_length(), max_context.bit_length()

    def choose(self, num_seqs: int, num_tokens: int, max_context: int) -> int:
        if self.fixed is not None:
            return max(1, min(self.fixed, num_seqs))
        usable = [c for c in self.candidates if c <= num_seqs]
        if len(usable) == 1:
            return 1
        key = self.bucket(num_seqs, num_tokens, max_context)
        times = self._times.setdefault(key, {})
        step = self._steps[key] = self._steps.get(key, 0) + 1
        for c in usable:  # not measured enough yet
            if len(times.get(c, ())) < self.probes:
                return c
        best = min(usable, key=lambda c: min(times[c]))
        if step % self.retry == 0:  # look at the others again now and then
            others = [c for c in usable if c != best]
            return others[(step // self.retry) % len(others)]
        return best

    def record(self, num_seqs: int, num_tokens: int, max_context: int, count: int, seconds: float) -> None:
        if self.fixed is not None:
            return
        key = self.bucket(num_seqs, num_tokens, max_context)
        recent = self._times.setdefault(key, {}).setdefault(count, [])
        recent.append(seconds)
        del recent[: -self.window]

