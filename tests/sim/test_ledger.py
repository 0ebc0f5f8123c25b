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


def _pool(placement="spread", workers=4, cap=10_000, tpw=100, threshold=50, slots=3):
    share = np.full(workers, 1 / workers) if placement == "head" else None
    return PoolLedger(slots, 10_000, cap, workers, threshold, tpw, placement, share)


def test_spread_placement_chunks_over_distinct_workers():
    led = _pool()
    ctx = np.zeros(3, np.int64)
    # Slot 0 prefills 350 tokens: 50 stay on the base, 300 go to the pool in chunks of 100.
    assert led.try_allocate(ctx, np.array([350, 0, 0])) is None
    assert led.owned[0].tolist() == [100, 100, 100, 0]  # three distinct least-loaded workers
    assert led.load.tolist() == [100, 100, 100, 0]
    # Slot 1 takes the empty worker first.
    assert led.try_allocate(ctx, np.array([0, 60, 0])) is None
    assert led.owned[1].tolist() == [0, 0, 0, 10]
    # Decode tokens extend the open chunk (fast path), then open a new one.
    ctx = np.array([350, 60, 0])
    for _ in range(3):
        assert led.try_allocate(ctx, np.array([1, 1, 0])) is None
        ctx += np.array([1, 1, 0])
    assert led.owned[1, 3] == 13
    assert led.owned[0].sum() == 303
    led.free(0)
    assert led.load.tolist() == [0, 0, 0, 13] and led.owned[0].sum() == 0


def test_pack_placement_fills_the_first_worker():
    led = _pool("pack")
    assert led.try_allocate(np.zeros(3, np.int64), np.array([250, 150, 0])) is None
    assert led.load.tolist() == [300, 0, 0, 0]
    led = _pool("pack", cap=120)
    assert led.try_allocate(np.zeros(3, np.int64), np.array([250, 150, 0])) is None
    assert led.load.tolist() == [120, 120, 60, 0]


def test_pool_capacity_overflow_is_transactional():
    led = _pool(cap=120, workers=2)
    ctx = np.zeros(3, np.int64)
    assert led.try_allocate(ctx, np.array([250, 0, 0])) is None  # 200 pool tokens, 100 + 100
    before = (led.load.copy(), led.owned.copy())
    domain = led.try_allocate(ctx, np.array([0, 150, 0]))  # 100 more pool tokens: 40 free
    assert domain is not None and domain[0] == "pool"
    np.testing.assert_array_equal(led.load, before[0])
    np.testing.assert_array_equal(led.owned, before[1])
    assert led.try_allocate(ctx, np.array([0, 80, 0])) is None  # 30 pool tokens fit


def test_head_placement_splits_every_pool_token():
    led = _pool("head", threshold=0)
    assert led.try_allocate(np.zeros(3, np.int64), np.array([40, 0, 8])) is None
    assert led.load.tolist() == [48, 48, 48, 48]  # whole-token units: each worker holds 1/4 of each
    led.free(0)
    assert led.load.tolist() == [8, 8, 8, 8]


def test_pool_admission_counts_promised_tokens():
    led = _pool(cap=100, workers=2, threshold=50)  # 200 pool tokens in all
    committed = np.zeros(3, np.int64)
    led.begin_admission(committed)
    assert led.can_admit(0, 250)  # 50 base + 200 pool
    assert led.admit(0, 0, 0, 200)  # promised for a later prefill: 150 pool tokens
    assert not led.can_admit(0, 120)  # 70 more pool tokens, only 50 left
    assert led.admit(1, 0, 90, 0)  # placed now: 40 pool tokens
    assert led.load.sum() == 40 and not led.can_admit(0, 61)


def test_base_overflow():
    led = PoolLedger(
        2,
        base_capacity=60,
        worker_capacity=1000,
        num_workers=1,
        threshold=50,
        tokens_per_worker=100,
        placement="spread",
    )
    assert led.try_allocate(np.zeros(2, np.int64), np.array([500, 10])) is None  # base 50 + 10
    assert led.try_allocate(np.array([500, 10]), np.array([0, 1])) == ("base", 0)
