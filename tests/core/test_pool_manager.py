"""PoolManager: where a sequence's KV blocks live on the attention pool.

Pure bookkeeping, no tensors. Every test uses block_size 4 and pool_threshold 8, so positions
0..7 stay local (pool_start 8) and pool block i of a segment starting at S covers positions
S + 4i .. S + 4i + 3.
"""

import pytest

from fapool.config import PoolConfig
from fapool.core.pool_manager import PoolEvent, PoolManager

BS = 4


def _pm(workers=3, blocks=6, per_worker=8, mode="shard", threshold=8):
    cfg = PoolConfig(
        attention_workers=workers, pool_threshold=threshold, tokens_per_pool_worker=per_worker, pool_mode=mode
    )
    return PoolManager(cfg, BS, blocks)


def _layout(pm, rid):
    """[(segment start, [(worker, block ids), ...]), ...]"""
    return [(s.start, [(h.worker, list(h.block_ids)) for h in s.holders]) for s in pm.segments_of(rid)]


def _used(pm):
    return {w: p.num_used_blocks for w, p in pm.pools.items()}


def _snapshot(pm):
    return (
        _used(pm),
        {rid: _layout(pm, rid) for rid in pm.segments},
        {rid: list(ws) for rid, ws in pm.assigned.items()},
        list(pm.history),
        {w: [b.ref_cnt for b in p.blocks] for w, p in pm.pools.items()},
    )


def _grow(rid, *workers, step=0):
    return PoolEvent(step, rid, "grow", tuple(workers))


# Geometry ---------------------------------------------------------------------------------
def test_geometry_rounds_threshold_and_segment_up_to_whole_blocks():
    pm = _pm(threshold=9, per_worker=5)
    assert (pm.local_blocks, pm.pool_start, pm.segment_blocks) == (3, 12, 2)
    assert sorted(pm.pools) == [1, 2, 3] and pm.alive == {1, 2, 3} and pm.enabled
    assert [pm.pool_blocks_needed(n) for n in (0, 12, 13, 16, 17)] == [0, 0, 1, 1, 2]


def test_no_attention_workers_disables_the_pool():
    pm = _pm(workers=0)
    assert not pm.enabled and pm.pools == {}
    assert pm.pool_blocks_needed(1000) == 0
    assert pm.allocate("a", 1000) and pm.segments_of("a") == [] and pm.history == []


# Grow (shard) -----------------------------------------------------------------------------
def test_shard_grows_one_worker_per_segment_then_reuses_least_loaded():
    pm = _pm(workers=3, blocks=6, per_worker=8)  # segments of 2 blocks (8 tokens)

    assert pm.allocate("a", 8)  # below the threshold: nothing in the pool
    assert pm.segments_of("a") == [] and pm.workers_of("a") == [] and pm.active_workers() == set()
    assert _used(pm) == {1: 0, 2: 0, 3: 0} and pm.history == []

    assert pm.allocate("a", 9)  # position 8: first pool block
    assert _layout(pm, "a") == [(8, [(1, [0])])]
    assert pm.history == [_grow("a", 1)]

    assert pm.allocate("a", 16)  # fills the open segment, same worker, no event
    assert _layout(pm, "a") == [(8, [(1, [0, 1])])]
    assert pm.history == [_grow("a", 1)]

    assert pm.allocate("a", 17)  # segment full: next one on a new worker
    assert _layout(pm, "a") == [(8, [(1, [0, 1])]), (16, [(2, [0])])]
    assert pm.history == [_grow("a", 1), _grow("a", 1, 2)]

    # 32 more positions (8 blocks) in one call: fill worker 2, grow to worker 3, then all
    # three workers serve it and the least loaded (a tie at 2 blocks: lowest id) takes the next.
    assert pm.allocate("a", 40)
    assert _layout(pm, "a") == [
        (8, [(1, [0, 1])]),
        (16, [(2, [0, 1])]),
        (24, [(3, [0, 1])]),
        (32, [(1, [2, 3])]),
    ]
    assert pm.history == [_grow("a", 1), _grow("a", 1, 2), _grow("a", 1, 2, 3)]
    assert pm.workers_of("a") == [1, 2, 3]
    assert pm.active_workers() == {1, 2, 3}
    assert pm.kv_tokens_per_worker() == {1: 16, 2: 8, 3: 8}

    assert pm.allocate("a", 48)  # worker 1 has 4 blocks, 2 and 3 have 2: worker 2
    assert _layout(pm, "a")[-1] == (40, [(2, [2, 3])])
    assert len(pm.history) == 3  # no new worker, no event
    assert pm.kv_tokens_per_worker() == {1: 16, 2: 16, 3: 8}


def test_allocate_is_idempotent_for_positions_already_held():
    pm = _pm()
    assert pm.allocate("a", 20)
    before = _snapshot(pm)
    assert pm.allocate("a", 20) and pm.allocate("a", 17) and pm.allocate("a", 3)
    assert _snapshot(pm) == before


def test_workers_of_returns_a_copy():
    pm = _pm()
    pm.allocate("a", 9)
    pm.workers_of("a").append(99)
    assert pm.workers_of("a") == [1]


def test_history_records_the_step():
    pm = _pm()
    pm.step = 7
    pm.allocate("a", 9)
    assert pm.history == [_grow("a", 1, step=7)]


# Balance ----------------------------------------------------------------------------------
def test_new_sequence_starts_on_least_used_worker():
    pm = _pm(workers=3, blocks=6, per_worker=8)
    assert pm.allocate("a", 20)  # worker 1: 2 blocks, worker 2: 1 block
    assert _layout(pm, "a") == [(8, [(1, [0, 1])]), (16, [(2, [0])])]
    assert pm.allocate("b", 9)  # worker 3 is empty
    assert _layout(pm, "b") == [(8, [(3, [0])])]
    assert pm.allocate("b", 24)  # fills its open segment, then worker 2 (1 used) beats worker 1 (2)
    assert _layout(pm, "b") == [(8, [(3, [0, 1])]), (16, [(2, [1, 2])])]
    assert pm.workers_of("b") == [3, 2]
    # One event per call that adds workers (a's call added two at once).
    assert pm.history == [_grow("a", 1, 2), _grow("b", 3), _grow("b", 3, 2)]
    assert _used(pm) == {1: 2, 2: 3, 3: 2}


def test_own_workers_chosen_by_fewest_used_blocks_not_round_robin():
    pm = _pm(workers=2, blocks=6, per_worker=8)
    assert pm.allocate("a", 24)  # worker 1 [0, 1], worker 2 [0, 1]
    assert pm.allocate("b", 16)  # tie 2-2: worker 1
    assert _layout(pm, "b") == [(8, [(1, [2, 3])])]
    assert pm.allocate("a", 32)  # a's workers: 1 has 4 used, 2 has 2: worker 2
    assert _layout(pm, "a") == [(8, [(1, [0, 1])]), (16, [(2, [0, 1])]), (24, [(2, [2, 3])])]
    assert _used(pm) == {1: 4, 2: 4}


# Spill and all-or-nothing -----------------------------------------------------------------
def test_segment_cut_short_when_its_worker_is_full_spills_to_worker_with_room():
    pm = _pm(workers=2, blocks=3, per_worker=16)  # segments of 4 blocks, workers of 3
    assert pm.allocate("a", 20)  # 3 blocks: worker 1 is now full, its segment open (3 of 4)
    assert _layout(pm, "a") == [(8, [(1, [0, 1, 2])])]
    assert pm.allocate("a", 24)  # the 4th block cannot go to worker 1: new segment on 2
    assert _layout(pm, "a") == [(8, [(1, [0, 1, 2])]), (20, [(2, [0])])]
    assert pm.history == [_grow("a", 1), _grow("a", 1, 2)]


def test_one_call_spreads_over_workers_when_one_lacks_room():
    pm = _pm(workers=2, blocks=3, per_worker=16)
    assert pm.allocate("a", 32)  # 6 blocks: 3 (all of worker 1) + 3 (all of worker 2)
    assert _layout(pm, "a") == [(8, [(1, [0, 1, 2])]), (20, [(2, [0, 1, 2])])]
    assert _used(pm) == {1: 3, 2: 3}


def test_other_sequence_spills_past_full_worker():
    pm = _pm(workers=2, blocks=3, per_worker=8)  # segments of 2 blocks, workers of 3
    assert pm.allocate("a", 24)  # worker 1 [0, 1], worker 2 [0, 1]
    assert pm.allocate("b", 16)  # 2 blocks, but only 1 free per worker: 1 + 1
    assert _layout(pm, "b") == [(8, [(1, [2])]), (12, [(2, [2])])]
    assert pm.workers_of("b") == [1, 2]
    assert _used(pm) == {1: 3, 2: 3}


def test_allocation_failure_and_dry_run_change_nothing():
    pm = _pm(workers=2, blocks=3, per_worker=8)  # 6 pool blocks in all
    assert pm.allocate("a", 24)  # 4 blocks
    before = _snapshot(pm)

    assert not pm.allocate("b", 20)  # 3 blocks, 2 free: all or nothing
    assert not pm.allocate("b", 20, dry_run=True)
    assert not pm.allocate("a", 36)  # a's own growth: 3 more blocks, 2 free
    assert _snapshot(pm) == before
    assert "b" not in pm.segments and pm.workers_of("b") == []

    assert pm.allocate("b", 16, dry_run=True)  # 2 blocks would fit
    assert _snapshot(pm) == before
    assert pm.allocate("a", 24, dry_run=True)  # nothing new needed

    assert pm.allocate("b", 16)
    assert _used(pm) == {1: 3, 2: 3}
    assert not pm.allocate("b", 17)  # the pool is full
    assert not pm.allocate("c", 9)
    assert "c" not in pm.segments and pm.workers_of("c") == []


def test_can_ever_fit_shard_counts_all_workers():
    pm = _pm(workers=2, blocks=3)
    assert pm.can_ever_fit(8 + 6 * BS)  # 6 blocks over both workers
    assert not pm.can_ever_fit(8 + 6 * BS + 1)
    assert pm.can_ever_fit(8)  # nothing in the pool


@pytest.mark.parametrize("mode", ["replicate", "head"])
def test_can_ever_fit_replicate_and_head_count_one_worker(mode):
    pm = _pm(workers=2, blocks=3, mode=mode)
    assert pm.can_ever_fit(8 + 3 * BS)  # every worker holds the whole pool region
    assert not pm.can_ever_fit(8 + 3 * BS + 1)


# Release ----------------------------------------------------------------------------------
def test_free_returns_every_block_and_records_release():
    pm = _pm(workers=3, blocks=6, per_worker=8)
    assert pm.allocate("a", 40) and pm.allocate("b", 20)
    assert _layout(pm, "b") == [(8, [(2, [2, 3])]), (16, [(3, [2])])]  # least used first
    assert _used(pm) == {1: 4, 2: 4, 3: 3}
    pm.step = 3
    pm.free("a")
    assert _used(pm) == {1: 0, 2: 2, 3: 1}  # only b's blocks left
    assert pm.history[-1] == PoolEvent(3, "a", "release", ())
    assert pm.segments_of("a") == [] and pm.workers_of("a") == []
    assert pm.active_workers() == set(pm.workers_of("b")) == {2, 3}
    pm.free("b")
    assert _used(pm) == {1: 0, 2: 0, 3: 0}
    assert pm.active_workers() == set()
    assert pm.kv_tokens_per_worker() == {1: 0, 2: 0, 3: 0}
    assert [e.action for e in pm.history].count("release") == 2
    assert all(b.ref_cnt == 0 for p in pm.pools.values() for b in p.blocks)


def test_free_without_pool_kv_records_nothing():
    pm = _pm()
    pm.allocate("a", 8)  # local only
    pm.free("a")
    pm.free("never-seen")
    assert pm.history == []


def test_freed_blocks_are_reused():
    pm = _pm(workers=2, blocks=3, per_worker=8)
    assert pm.allocate("a", 32)
    assert not pm.allocate("b", 9)
    pm.free("a")
    assert pm.allocate("b", 32)  # all 6 blocks again
    assert _used(pm) == {1: 3, 2: 3}


# Replicate and head modes -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["replicate", "head"])
def test_one_segment_on_every_worker_growing_in_place(mode):
    pm = _pm(workers=3, blocks=6, per_worker=8, mode=mode)  # per_worker plays no part
    assert pm.allocate("a", 8) and pm.segments_of("a") == []
    assert pm.allocate("a", 9)
    assert _layout(pm, "a") == [(8, [(1, [0]), (2, [0]), (3, [0])])]
    assert pm.history == [_grow("a", 1, 2, 3)]
    assert pm.allocate("a", 24)
    assert _layout(pm, "a") == [(8, [(1, [0, 1, 2, 3]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3])])]
    assert pm.history == [_grow("a", 1, 2, 3)]
    assert pm.kv_tokens_per_worker() == {1: 16, 2: 16, 3: 16}
    assert pm.workers_of("a") == [1, 2, 3]

    assert pm.allocate("b", 12)  # a second sequence: its own segment, on every worker too
    assert _layout(pm, "b") == [(8, [(1, [4]), (2, [4]), (3, [4])])]
    assert not pm.allocate("b", 20)  # 2 more blocks on each worker, 1 free on each
    assert _layout(pm, "b") == [(8, [(1, [4]), (2, [4]), (3, [4])])]
    assert pm.allocate("b", 16)  # the last free block of each worker
    assert _layout(pm, "b") == [(8, [(1, [4, 5]), (2, [4, 5]), (3, [4, 5])])]
    assert _used(pm) == {1: 6, 2: 6, 3: 6}


@pytest.mark.parametrize("mode", ["replicate", "head"])
def test_replicate_and_head_allocation_is_all_or_nothing(mode):
    pm = _pm(workers=2, blocks=4, mode=mode)
    assert pm.allocate("a", 8 + 3 * BS)  # 3 of 4 blocks on each worker
    before = _snapshot(pm)
    assert not pm.allocate("a", 8 + 5 * BS)  # 2 more, 1 free on each
    assert not pm.allocate("b", 8 + 2 * BS)
    assert not pm.allocate("b", 8 + 2 * BS, dry_run=True)
    assert _snapshot(pm) == before
    assert pm.allocate("a", 8 + 4 * BS)  # exactly the last block on each
    assert _layout(pm, "a") == [(8, [(1, [0, 1, 2, 3]), (2, [0, 1, 2, 3])])]
    pm.free("a")
    assert _used(pm) == {1: 0, 2: 0} and pm.active_workers() == set()
    assert pm.history[-1] == PoolEvent(0, "a", "release", ())


# Fork and copy-on-write -------------------------------------------------------------------
def test_fork_shares_blocks_and_copy_on_write_gives_private_copies():
    pm = _pm(workers=2, blocks=4, per_worker=8)
    assert pm.allocate("p", 14)  # positions 8..13: worker 1 blocks [0, 1], block 1 partial
    pm.step = 2
    pm.fork("p", "c")
    assert _layout(pm, "c") == _layout(pm, "p") == [(8, [(1, [0, 1])])]
    assert [b.ref_cnt for b in pm.pools[1].blocks] == [2, 2, 0, 0]
    assert _used(pm) == {1: 2, 2: 0}
    assert pm.workers_of("c") == [1]
    assert pm.history[-1] == _grow("c", 1, step=2)

    assert pm.write_position_needs_copy("c", 14)  # block 1 is shared
    assert pm.write_position_needs_copy("p", 8)
    assert not pm.write_position_needs_copy("c", 5)  # local position
    assert not pm.write_position_needs_copy("c", 16)  # beyond its pool blocks

    assert pm.copy_on_write("c", 14)
    assert _layout(pm, "c") == [(8, [(1, [0, 2])])]
    assert _layout(pm, "p") == [(8, [(1, [0, 1])])]  # the parent keeps its blocks
    assert [b.ref_cnt for b in pm.pools[1].blocks] == [2, 1, 1, 0]
    assert pm.take_pending_copies() == [(1, 1, 2)]  # (worker, src, dst)
    assert pm.take_pending_copies() == []
    assert not pm.write_position_needs_copy("c", 14)
    assert not pm.write_position_needs_copy("p", 14)  # the parent now owns block 1 alone
    assert pm.copy_on_write("c", 14)  # nothing shared: no copy
    assert pm.copy_on_write("c", 5)  # not a pool position: nothing to do
    assert pm.take_pending_copies() == []

    # The child grows on its own; freeing both returns everything.
    assert pm.allocate("c", 17)
    assert _layout(pm, "c") == [(8, [(1, [0, 2])]), (16, [(2, [0])])]
    assert _layout(pm, "p") == [(8, [(1, [0, 1])])]
    pm.free("p")
    assert [b.ref_cnt for b in pm.pools[1].blocks] == [1, 0, 1, 0]
    pm.free("c")
    assert _used(pm) == {1: 0, 2: 0}


def test_fork_without_pool_kv_does_nothing():
    pm = _pm()
    pm.allocate("p", 8)
    pm.fork("p", "c")
    assert pm.segments_of("c") == [] and pm.workers_of("c") == [] and pm.history == []


def test_copy_on_write_without_free_block_changes_nothing():
    pm = _pm(workers=2, blocks=3, per_worker=8)
    assert pm.allocate("p", 14)  # worker 1 [0, 1]
    pm.fork("p", "c")
    assert pm.copy_on_write("c", 13)  # the last free block of worker 1
    assert _layout(pm, "c") == [(8, [(1, [0, 2])])]
    pm.take_pending_copies()
    before = _snapshot(pm)
    assert pm.write_position_needs_copy("c", 8)  # block 0 still shared
    assert not pm.copy_on_write("c", 8)
    assert _snapshot(pm) == before
    assert pm.take_pending_copies() == []


def test_copy_on_write_copies_on_every_holder_in_replicate_mode():
    pm = _pm(workers=2, blocks=4, mode="replicate")
    assert pm.allocate("p", 14)
    pm.fork("p", "c")
    assert pm.copy_on_write("c", 13)
    assert pm.take_pending_copies() == [(1, 1, 2), (2, 1, 2)]
    assert _layout(pm, "c") == [(8, [(1, [0, 2]), (2, [0, 2])])]
    assert _layout(pm, "p") == [(8, [(1, [0, 1]), (2, [0, 1])])]


# Worker failure ---------------------------------------------------------------------------
def test_mark_dead_reports_requests_and_placement_avoids_the_worker():
    pm = _pm(workers=3, blocks=6, per_worker=8)
    assert pm.allocate("a", 20)  # worker 1 [0, 1], worker 2 [0]
    assert pm.allocate("b", 9)  # worker 3 [0]
    assert pm.can_ever_fit(8 + 18 * BS) and not pm.can_ever_fit(8 + 18 * BS + 1)

    assert pm.mark_dead(2) == ["a"]
    assert pm.alive == {1, 3} and pm.enabled
    before = _snapshot(pm)
    assert pm.allocate("a", 20)  # already held: fine
    assert not pm.allocate("a", 21)  # more KV for a request with KV on a dead worker: no
    assert not pm.allocate("a", 21, dry_run=True)
    assert _snapshot(pm) == before

    assert pm.allocate("c", 24)  # 4 blocks: worker 3 (1 used) then worker 1, never 2
    assert _layout(pm, "c") == [(8, [(3, [1, 2])]), (16, [(1, [2, 3])])]
    assert pm.allocate("b", 32)  # b: 6 blocks over workers 3 and 1 only
    assert all(w != 2 for _, holders in _layout(pm, "b") for w, _ in holders)
    assert pm.can_ever_fit(8 + 12 * BS) and not pm.can_ever_fit(8 + 12 * BS + 1)

    assert sorted(pm.mark_dead(1)) == ["a", "b", "c"]
    assert pm.mark_dead(3) == ["b", "c"]
    assert not pm.enabled
    pm.free("a")
    assert pm.pools[2].num_used_blocks == 0  # freeing onto a dead worker's pool still works


def test_mark_dead_in_replicate_mode_shrinks_new_segments():
    pm = _pm(workers=3, blocks=2, mode="replicate")
    assert pm.allocate("a", 9)
    assert pm.mark_dead(2) == ["a"]
    assert not pm.allocate("a", 13)
    assert pm.allocate("b", 9)
    assert _layout(pm, "b") == [(8, [(1, [1]), (3, [1])])]
    assert pm.workers_of("b") == [1, 3]
    assert pm.can_ever_fit(8 + 2 * BS) and not pm.can_ever_fit(8 + 2 * BS + 1)


def test_workers_at_predicts_allocate_across_requests_and_changes_nothing():
    """Where an elastic pool starts workers ahead: the dry run places the requests in turn, as
    allocate() would (so two sequences crossing the threshold together spread over two workers),
    includes the workers already serving them, and leaves the pool untouched."""
    pm = _pm(workers=3, per_worker=8, threshold=8)
    assert pm.allocate("a", 12)  # a: one pool block on worker 1
    before = _snapshot(pm)
    assert pm.workers_at({"a": 12, "b": 8}) == {1}  # b still fits locally
    assert pm.workers_at({"b": 16, "c": 16}) == {2, 3}  # least loaded first, each in turn
    assert pm.workers_at({"a": 24}) == {1, 2}  # a's next segment opens on a new worker
    assert _snapshot(pm) == before
    for rid, n in {"b": 16, "c": 16}.items():
        pm.allocate(rid, n)
    assert set(pm.workers_of("b")) | set(pm.workers_of("c")) == {2, 3}
