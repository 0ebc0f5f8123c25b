import numpy as np

from fapool.sim.ledger import GroupLedger, PoolLedger


def test_group_ledger_reports_the_overflowing_group():
    led = GroupLedger(capacity=100, num_groups=2, group_of_slot=np.array([0, 0, 1, 1]))
    ctx = np.array([40, 40, 10, 0])
    assert led.try_allocate(ctx, np.array([10, 10, 1, 0])) is None
    assert led.try_allocate(ctx, np.array([11, 10, 0, 0])) == ("group", 0)
    led.begin_admission(ctx)
    assert led.can_admit(1, 90) and not led.can_admit(1, 91)
    assert led.admit(3, 1, 50, 0) and not led.can_admit(1, 41)
    assert led.holds(("group", 1)).tolist() == [False, False, True, True]


def _pool(mode="shard", workers=4, cap=10_000, tpw=100, threshold=50, slots=3):
    share = np.full(workers, 1 / workers) if mode == "head" else None
    return PoolLedger(slots, 10_000, cap, workers, threshold, tpw, mode, share)


def test_shard_places_segments_as_the_engines_pool_manager():
    led = _pool()
    assert 50 % led.block_size == 0 and led.pm is not None  # blocks divide threshold and segment
    ctx = np.zeros(3, np.int64)
    # Slot 0 prefills 350 tokens: 50 stay on the base, 300 go to the pool in segments of 100
    # on three distinct workers (the sequence's pool grows with its length).
    assert led.try_allocate(ctx, np.array([350, 0, 0])) is None
    assert sorted(led.owned[0].tolist()) == [0, 100, 100, 100]
    assert led.pm.workers_of("0") == [w + 1 for w in np.flatnonzero(led.owned[0])]
    # Slot 1 takes the empty worker first (least used blocks).
    assert led.try_allocate(ctx, np.array([0, 60, 0])) is None
    empty = int(np.flatnonzero(led.owned[0] == 0)[0])
    assert led.owned[1, empty] == 10
    # Decode tokens extend the open segment, then open a new one.
    ctx = np.array([350, 60, 0])
    for _ in range(3):
        assert led.try_allocate(ctx, np.array([1, 1, 0])) is None
        ctx += np.array([1, 1, 0])
    assert led.owned[1, empty] == 13
    assert led.owned[0].sum() == 303 and led.placed.sum() == 2
    led.free(0)
    assert led.owned.sum() == 13 and led.owned[0].sum() == 0 and led.pm.workers_of("0") == []


def test_a_retried_step_does_not_count_tokens_twice():
    led = _pool(cap=150, workers=2)  # 150 tokens a worker
    ctx = np.zeros(3, np.int64)
    assert led.try_allocate(ctx, np.array([250, 0, 0])) is None  # 200 pool tokens: 4 blocks
    # Slot 1 fits (2 blocks), slot 2 does not: the pool is full; slot 1 keeps its blocks.
    domain = led.try_allocate(ctx, np.array([0, 110, 110]))
    assert domain is not None and domain[0] == "pool"
    led.free(2)
    held = led.owned.sum()
    assert held == 260
    assert led.try_allocate(ctx, np.array([0, 110, 0])) is None  # the retry: already counted
    assert led.owned.sum() == held


def test_replicate_holds_every_pool_token_on_every_worker_and_splits_queries():
    led = _pool("replicate", workers=2, threshold=50)
    assert led.try_allocate(np.zeros(3, np.int64), np.array([150, 90, 0])) is None
    assert led.owned[:2].tolist() == [[100, 100], [40, 40]]
    # Each slot's query goes to one holder, by its index in the batch.
    assert led.attend(np.array([0, 1])).tolist() == [[100, 0], [0, 40]]


def test_head_mode_splits_every_pool_token():
    led = _pool("head", threshold=0)
    assert led.try_allocate(np.zeros(3, np.int64), np.array([40, 0, 8])) is None
    assert led.owned.sum(0).tolist() == [48, 48, 48, 48]  # whole-token units: each worker holds 1/4 of each
    led.free(0)
    assert led.owned.sum(0).tolist() == [8, 8, 8, 8]


def test_pool_admission_counts_promised_tokens():
    led = _pool(cap=100, workers=2, threshold=50)  # 200 pool tokens in all
    committed = np.zeros(3, np.int64)
    led.begin_admission(committed)
    assert led.can_admit(0, 250)  # 50 base + 200 pool
    assert led.admit(0, 0, 0, 200)  # promised for a later prefill: 150 pool tokens
    assert not led.can_admit(0, 120)  # 70 more pool tokens, only 50 left
    assert led.admit(1, 0, 90, 0)  # placed now: 40 pool tokens
    assert led.owned.sum() == 40 and not led.can_admit(0, 61)


def test_base_overflow():
    led = PoolLedger(2, base_capacity=60, worker_capacity=1000, num_workers=1, threshold=50,
                     tokens_per_worker=100, mode="shard")
    assert led.try_allocate(np.zeros(2, np.int64), np.array([500, 10])) is None  # base 50 + 10
    assert led.try_allocate(np.array([500, 10]), np.array([0, 1])) == ("base", 0)


def test_block_size_never_cuts_a_workers_capacity():
    """A threshold and segment with no large common divisor (1000, 4096): the blocks stay
    small enough to hold the placement, and the worker keeps its whole capacity."""
    led = PoolLedger(2, base_capacity=10_000, worker_capacity=800_000, num_workers=2, threshold=1000,
                     tokens_per_worker=4096, mode="shard")
    pool = led.pm.pools[1]
    assert pool.num_blocks * led.block_size >= 800_000 - led.block_size
    assert led.pool_start - 1000 < led.block_size  # the threshold rounded up by less than a block


def test_replicate_routes_queries_as_the_engines_step_plan():
    """Position i of micro-batch k goes to holder (k + i) % workers (fapool.worker.step_plan)."""
    led = _pool("replicate", workers=2, threshold=50, slots=4)
    assert led.try_allocate(np.zeros(4, np.int64), np.array([150, 90, 70, 60])) is None
    second = led.attend(np.array([2, 3]), micro_batch=1)
    assert second.tolist() == [[0, 20], [10, 0]]
