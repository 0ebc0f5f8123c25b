"""Step plans: which attention worker gets which query rows and new K/V rows of a micro-batch.

Pure host-side bookkeeping. block_size 4, pool_start 8 throughout: positions 0..7 are local,
a pool position p in a segment starting at S lives in slot
block_ids[(p - S) // 4] * 4 + (p - S) % 4 of the holder's worker.
"""

import random

import pytest
import torch

from fapool.config import PoolConfig
from fapool.core.block_pool import KVBlock
from fapool.core.pool_manager import PoolManager, Segment, SegmentBlocks
from fapool.core.scheduler import ScheduledRequest
from fapool.request import Request
from fapool.sampling_params import SamplingParams
from fapool.worker.step_plan import (
    Entry,
    MicroBatchPlan,
    Route,
    WorkerBatch,
    plan_micro_batch,
    slots_of,
    split_micro_batches,
)

BS = 4
POOL_START = 8


def _tokens(rid_index, n):
    return [1000 * rid_index + p for p in range(n)]


def _sched(rid, num_tokens, computed, new, local_blocks, segments=(), index=0):
    req = Request(rid, _tokens(index, num_tokens), SamplingParams(), max_tokens=16)
    return ScheduledRequest(req, new, computed, list(local_blocks), list(segments))


def _holder(worker, block_ids):
    h = SegmentBlocks(worker)
    h.add([KVBlock(i, worker) for i in block_ids])
    return h


def _seg(start, *holders):
    return Segment(start, [_holder(w, ids) for w, ids in holders])


def _local(plan):
    m = plan.local_meta_args
    return m["query_lens"], m["query_pos_start"], m["kv_lens"], m["block_tables"], m["slot_mapping"]


# Shard mode, with placement from a real PoolManager --------------------------------------
def _shard_pool():
    pm = PoolManager(PoolConfig(attention_workers=2, pool_threshold=8, tokens_per_pool_worker=8), BS, 8)
    assert pm.allocate("z", 16)  # another sequence: worker 1 blocks [0, 1]
    assert pm.allocate("a", 20)  # a: positions 8..15 on worker 2 [0, 1], 16..19 on worker 1 [2]
    segs = pm.segments_of("a")
    assert [(s.start, [(h.worker, h.block_ids) for h in s.holders]) for s in segs] == [
        (8, [(2, [0, 1])]),
        (16, [(1, [2])]),
    ]
    return pm


def test_shard_prefill_chunk_over_local_region_and_two_segments():
    pm = _shard_pool()
    # b: no pool KV (everything local, even past pool_start), one decode token at position 9.
    b = _sched("b", 10, 9, 1, [7, 6, 4], index=1)
    # a: chunk of positions 6..19: 2 local, 8 in segment 0 (worker 2), 4 in segment 1 (worker 1).
    a = _sched("a", 20, 6, 14, [5, 3], pm.segments_of("a"), index=2)
    plan = plan_micro_batch([b, a], BS, POOL_START, "shard")

    assert isinstance(plan, MicroBatchPlan) and plan.num_tokens == 15
    assert plan.scheduled == [b, a]
    assert plan.input_ids == [1009] + [2000 + p for p in range(6, 20)]
    assert plan.positions == [9] + list(range(6, 20))
    q_lens, q_starts, kv_lens, tables, slots = _local(plan)
    assert q_lens == [1, 14] and q_starts == [9, 6]
    assert kv_lens == [10, 8]  # a's local KV stops at the pool start
    assert tables == [[7, 6, 4], [5, 3]]
    # b: position 9 -> block 4, offset 1. a: 6, 7 -> block 3; pool positions -> -1
    assert slots == [17, 14, 15] + [-1] * 12

    assert sorted(plan.routes) == [1, 2]
    r2 = plan.routes[2]
    assert isinstance(r2, Route) and r2.worker == 2
    assert r2.batch.entries == [Entry(12, 8, 8, 8, [0, 1])]  # queries at 8..19 see 8..15
    assert r2.q_rows == list(range(3, 15))  # token rows of positions 8..19 (b is row 0)
    assert r2.kv_rows == list(range(3, 11))  # positions 8..15 are stored here
    assert r2.batch.kv_slots == list(range(8))  # blocks 0, 1
    assert r2.rounds == [list(range(12))]
    assert r2.batch.num_q_rows == 12

    r1 = plan.routes[1]
    assert r1.batch.entries == [Entry(4, 16, 16, 4, [2])]  # queries at 16..19 see 16..19
    assert r1.q_rows == list(range(11, 15))
    assert r1.kv_rows == list(range(11, 15))
    assert r1.batch.kv_slots == [8, 9, 10, 11]  # block 2
    assert r1.rounds == [[0, 1, 2, 3]]


def test_shard_decode_reaches_every_segment_and_writes_one():
    pm = _shard_pool()
    assert pm.allocate("a", 21)  # position 20: second block of the open segment on worker 1
    a = _sched("a", 21, 20, 1, [5, 3], pm.segments_of("a"))
    plan = plan_micro_batch([a], BS, POOL_START, "shard")
    assert _local(plan) == ([1], [20], [8], [[5, 3]], [-1])
    assert plan.routes[2].batch.entries == [Entry(1, 20, 8, 8, [0, 1])]
    assert plan.routes[2].kv_rows == [] and plan.routes[2].batch.kv_slots == []  # read only
    assert plan.routes[1].batch.entries == [Entry(1, 20, 16, 5, [2, 3])]
    assert plan.routes[1].kv_rows == [0] and plan.routes[1].batch.kv_slots == [12]  # block 3, offset 0
    assert plan.routes[1].q_rows == plan.routes[2].q_rows == [0]


def test_local_only_batch_has_no_routes():
    a = _sched("a", 6, 0, 6, [2, 9])
    plan = plan_micro_batch([a], BS, POOL_START, "shard")
    assert plan.routes == {}
    assert _local(plan) == ([6], [0], [6], [[2, 9]], [8, 9, 10, 11, 36, 37])


def test_chunk_before_a_segment_does_not_route_to_it():
    # A chunk that ends before the pool region: the segment's worker gets nothing.
    a = _sched("a", 12, 0, 6, [2, 9], [_seg(8, (1, [0]))])
    plan = plan_micro_batch([a], BS, POOL_START, "shard")
    assert plan.routes == {}
    assert _local(plan)[2] == [6]


def test_rounds_separate_entries_of_one_sequence_on_one_worker():
    # a: two segments on worker 1 (one worker serves it all); b: one segment on worker 1.
    a = _sched("a", 24, 0, 24, [0, 1], [_seg(8, (1, [0, 1])), _seg(16, (1, [2, 3]))])
    b = _sched("b", 12, 11, 1, [2, 3], [_seg(8, (1, [4]))], index=1)
    plan = plan_micro_batch([a, b], BS, POOL_START, "shard")
    r = plan.routes[1]
    assert list(plan.routes) == [1]
    assert r.batch.entries == [
        Entry(16, 8, 8, 8, [0, 1]),  # a's queries 8..23 over 8..15
        Entry(8, 16, 16, 8, [2, 3]),  # a's queries 16..23 over 16..23
        Entry(1, 11, 8, 4, [4]),  # b's query 11 over 8..11
    ]
    assert r.q_rows == list(range(8, 24)) + list(range(16, 24)) + [24]
    # Round 0: each sequence's first entry; round 1: a's second entry (same tokens again).
    assert r.rounds == [list(range(16)) + [24], list(range(16, 24))]
    for rnd in r.rounds:
        tokens = [r.q_rows[i] for i in rnd]
        assert len(set(tokens)) == len(tokens)
    assert r.kv_rows == list(range(8, 24)) + [24]
    assert r.batch.kv_slots == list(range(16)) + [19]  # b: position 11 -> block 4, offset 3


def test_logit_rows_and_dense_view():
    pm = _shard_pool()
    b = _sched("b", 10, 9, 1, [7, 6, 4], index=1)  # decode: its token's logits are due
    a = _sched("a", 20, 6, 14, [5, 3], pm.segments_of("a"), index=2)  # last chunk: due
    c = _sched("c", 12, 0, 6, [1, 2], index=3)  # first chunk of 12: not due
    plan = plan_micro_batch([b, a, c], BS, POOL_START, "shard")
    assert plan.logit_rows == [0, 14]
    dense = plan.dense()
    assert dense.input_ids == plan.input_ids and dense.positions == plan.positions
    assert dense.meta_args is plan.local_meta_args
    assert dense.logit_rows == [0, 14] and dense.remote
    assert dense.routes is None
    # A pipeline stage gets the rows to cut for each worker, not the workers' own plans.
    staged = plan.dense(with_routes=True)
    assert set(staged.routes) == set(plan.routes)
    for w, r in staged.routes.items():
        assert (r.q_rows, r.kv_rows, r.rounds) == (plan.routes[w].q_rows, plan.routes[w].kv_rows, plan.routes[w].rounds)
        assert r.batch.entries == [] and r.batch.kv_slots == []
    assert not plan_micro_batch([c], BS, POOL_START, "shard").dense().remote


def test_without_a_pool_everything_is_local():
    a = _sched("a", 12, 6, 6, [2, 9, 4])  # pool_start None: no pool (the dense-only runner)
    plan = plan_micro_batch([a], BS)
    assert plan.routes == {} and plan.logit_rows == [5]
    assert _local(plan) == ([6], [6], [12], [[2, 9, 4]], [38, 39, 16, 17, 18, 19])


# Replicate mode -----------------------------------------------------------------------------
def test_replicate_prefill_splits_queries_and_writes_kv_on_every_holder():
    seg = _seg(8, (1, [0, 1]), (2, [4, 5]))
    a = _sched("a", 16, 6, 10, [5, 3], [seg])
    plan = plan_micro_batch([a], BS, POOL_START, "replicate")
    assert _local(plan) == ([10], [6], [8], [[5, 3]], [14, 15] + [-1] * 8)  # 6, 7: block 3
    r1, r2 = plan.routes[1], plan.routes[2]
    # 8 queries see the pool (positions 8..15): the first half to worker 1, the rest to worker 2.
    assert r1.batch.entries == [Entry(4, 8, 8, 8, [0, 1])]
    assert r1.q_rows == [2, 3, 4, 5]
    assert r2.batch.entries == [Entry(4, 12, 8, 8, [4, 5])]
    assert r2.q_rows == [6, 7, 8, 9]
    # Both hold the whole range: both store all 8 new rows.
    assert r1.kv_rows == r2.kv_rows == list(range(2, 10))
    assert r1.batch.kv_slots == list(range(8))
    assert r2.batch.kv_slots == list(range(16, 24))


def test_replicate_uneven_split_and_holder_without_queries():
    seg = _seg(8, (1, [0, 1]), (2, [2, 3]), (3, [4, 5]))
    a = _sched("a", 16, 8, 8, [0, 1], [seg])
    plan = plan_micro_batch([a], BS, POOL_START, "replicate")
    assert [plan.routes[w].q_rows for w in (1, 2, 3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [e.query_pos_start for w in (1, 2, 3) for e in plan.routes[w].batch.entries] == [8, 10, 13]

    # Two queries over three holders: the first holder gets none but still stores the K/V.
    b = _sched("b", 10, 8, 2, [0, 1], [seg])
    plan = plan_micro_batch([b], BS, POOL_START, "replicate")
    assert plan.routes[1].batch.entries == [] and plan.routes[1].q_rows == []
    assert plan.routes[1].kv_rows == [0, 1] and plan.routes[1].batch.kv_slots == [0, 1]
    # Each entry carries the blocks its 2 keys lie in (a copy: the holder's list keeps growing).
    assert plan.routes[2].batch.entries == [Entry(1, 8, 8, 2, [2])]
    assert plan.routes[3].batch.entries == [Entry(1, 9, 8, 2, [4])]


@pytest.mark.parametrize("batch_index, worker", [(0, 1), (1, 2), (2, 1), (3, 2)])
def test_replicate_decode_query_rotates_with_micro_batch_index(batch_index, worker):
    seg = _seg(8, (1, [0, 1, 2]), (2, [4, 5, 6]))
    a = _sched("a", 17, 16, 1, [5, 3], [seg])
    plan = plan_micro_batch([a], BS, POOL_START, "replicate", batch_index)
    other = 3 - worker
    assert plan.routes[worker].batch.entries == [Entry(1, 16, 8, 9, [0, 1, 2] if worker == 1 else [4, 5, 6])]
    assert plan.routes[worker].q_rows == [0]
    assert plan.routes[other].batch.entries == [] and plan.routes[other].rounds == []
    # Both store the new token: position 16 is block index 2, offset 0.
    assert plan.routes[1].batch.kv_slots == [8] and plan.routes[2].batch.kv_slots == [24]
    assert plan.routes[1].kv_rows == plan.routes[2].kv_rows == [0]


def test_replicate_decodes_alternate_holders_within_a_micro_batch():
    seg_a = _seg(8, (1, [0, 1, 2]), (2, [0, 1, 2]))
    seg_b = _seg(8, (1, [3]), (2, [3]))
    a = _sched("a", 17, 16, 1, [0, 1], [seg_a])
    b = _sched("b", 10, 9, 1, [2, 3], [seg_b], index=1)
    plan = plan_micro_batch([a, b], BS, POOL_START, "replicate")
    assert plan.routes[1].q_rows == [0] and plan.routes[2].q_rows == [1]
    plan = plan_micro_batch([a, b], BS, POOL_START, "replicate", batch_index=1)
    assert plan.routes[1].q_rows == [1] and plan.routes[2].q_rows == [0]


# Head mode ----------------------------------------------------------------------------------
def test_head_mode_sends_every_query_to_every_holder():
    seg = _seg(8, (1, [0, 1]), (2, [4, 5]))
    a = _sched("a", 16, 6, 10, [5, 3], [seg])
    plan = plan_micro_batch([a], BS, POOL_START, "head")
    for w, ids, slots in ((1, [0, 1], list(range(8))), (2, [4, 5], list(range(16, 24)))):
        r = plan.routes[w]
        assert r.batch.entries == [Entry(8, 8, 8, 8, ids)]
        assert r.q_rows == list(range(2, 10))
        assert r.kv_rows == list(range(2, 10))
        assert r.batch.kv_slots == slots
        assert r.rounds == [list(range(8))]

    d = _sched("d", 17, 16, 1, [5, 3], [_seg(8, (1, [0, 1, 2]), (2, [4, 5, 6]))])
    for batch_index in (0, 1):  # no rotation: both holders answer for their heads
        plan = plan_micro_batch([d], BS, POOL_START, "head", batch_index)
        assert plan.routes[1].q_rows == plan.routes[2].q_rows == [0]


# WorkerBatch ------------------------------------------------------------------------------
def test_worker_batch_metadata():
    batch = WorkerBatch([Entry(3, 8, 8, 5, [2, 7]), Entry(1, 20, 16, 5, [4, 1])], kv_slots=[9, 10, 11, 17])
    meta, kv_slots, sparse_rows = batch.metadata("cpu")
    assert batch.num_q_rows == 4 and sparse_rows.numel() == 0
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.query_pos_start.tolist() == [8, 20]
    assert meta.kv_start.tolist() == [8, 16]
    assert meta.kv_lens.tolist() == [5, 5]
    assert meta.block_tables.tolist() == [[2, 7], [4, 1]]
    assert meta.slot_mapping.tolist() == [-1, -1, -1, -1]  # K/V rows are written separately
    assert kv_slots.dtype == torch.int64 and kv_slots.tolist() == [9, 10, 11, 17]
    # A sparse entry (one query over chosen pages): no KV for the dense pass, its query row named.
    batch.sparse_entries, batch.sparse_pages = [1], 2
    meta, _, sparse_rows = batch.metadata("cpu")
    assert meta.kv_lens.tolist() == [5, 0] and sparse_rows.tolist() == [3]


# split_micro_batches ----------------------------------------------------------------------
def _sizes(groups):
    return [[s.num_new_tokens for s in g] for g in groups]


def _batch(*sizes):
    return [_sched(f"r{i}", n, 0, n, [0] * -(-n // BS), index=i) for i, n in enumerate(sizes)]


def test_split_balances_tokens_in_order():
    assert _sizes(split_micro_batches(_batch(5, 5, 5, 5), 2)) == [[5, 5], [5, 5]]
    assert _sizes(split_micro_batches(_batch(8, 1, 1, 1, 1, 8), 2)) == [[8, 1, 1], [1, 1, 8]]
    assert _sizes(split_micro_batches(_batch(10, 1, 1, 1, 1), 2)) == [[10], [1, 1, 1, 1]]
    assert _sizes(split_micro_batches(_batch(2, 2, 2, 2), 3)) == [[2, 2], [2], [2]]
    assert _sizes(split_micro_batches(_batch(3, 3, 3), 3)) == [[3], [3], [3]]


def test_split_count_one_or_less_is_one_group():
    s = _batch(3, 1, 4)
    assert split_micro_batches(s, 1) == [s]
    assert split_micro_batches(s, 0) == [s]


def test_split_count_above_len_gives_one_request_per_group():
    s = _batch(4, 4)
    groups = split_micro_batches(s, 5)
    assert groups == [[s[0]], [s[1]]]
    assert split_micro_batches(s[:1], 3) == [s[:1]]


def test_split_keeps_order_and_never_returns_empty_groups():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([1, 1, 1, 2, 5, 16, 64]) for _ in range(rng.randint(1, 9))]
        count = rng.randint(1, 6)
        s = _batch(*sizes)
        groups = split_micro_batches(s, count)
        assert [x for g in groups for x in g] == s  # every request once, in order
        assert all(groups)
        assert 1 <= len(groups) <= min(count, len(s))


def test_split_uses_the_groups_asked_for_when_a_big_request_comes_last():
    # Running decodes come before a newly admitted prompt: the prompt still gets its own group.
    assert _sizes(split_micro_batches(_batch(1, 1, 1, 1, 10), 2)) == [[1, 1, 1, 1], [10]]
    assert _sizes(split_micro_batches(_batch(1, 1, 10), 3)) == [[1], [1], [10]]


def test_the_plan_keeps_its_own_block_lists_while_the_managers_grow():
    """Async scheduling plans step n+1 while step n still builds its metadata: a plan must not
    alias the KV manager's lists, which grow as blocks are added."""
    seg = _seg(8, (1, [0, 1]))
    a = _sched("a", 12, 11, 1, [5, 3], [seg])
    plan = plan_micro_batch([a], BS, POOL_START, "shard")
    a.block_ids.append(7)
    seg.holders[0].add([KVBlock(9, 1)])
    assert _local(plan)[3] == [[5, 3]]
    assert plan.routes[1].batch.entries[0].block_ids == [0]


@pytest.mark.parametrize("start, end", [(0, 0), (3, 9), (5, 70), (13, 300), (64, 129)])
def test_slots_of_matches_the_per_position_formula(start, end):
    """The vectorised slot lookup (long runs) and the loop (short ones) agree with the definition."""
    blocks = random.Random(start).sample(range(1000), -(-end // BS) + 1)
    want = [blocks[p // BS] * BS + p % BS for p in range(start, end)]
    assert slots_of(blocks, start, end, BS) == want
