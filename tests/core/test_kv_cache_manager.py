"""KV cache manager: slots, prefix hits, copy-on-write after fork, all-or-nothing allocation."""

from fapool.core.block_pool import BlockPool
from fapool.core.kv_cache_manager import KVCacheManager
from fapool.request import Request
from fapool.sampling_params import SamplingParams


def _req(rid, tokens, n=1):
    return Request(rid, tokens, SamplingParams(n=n), max_tokens=100)


def test_allocate_grows_block_by_block():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    r = _req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    r.append_token(99)
    assert kv.allocate_slots(r, 1) and kv.block_ids("a") == [0, 1, 2]  # slot 10 is in block 2
    r.num_computed_tokens = 11
    r.append_token(98)
    r.num_computed_tokens = 12
    r.append_token(97)
    assert kv.allocate_slots(r, 1) and kv.block_ids("a") == [0, 1, 2, 3]


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(BlockPool(2), block_size=4)
    r = _req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.pool.num_free_blocks == 2 and "a" not in kv.block_tables


def test_prefix_hit_shares_blocks():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a = _req("a", list(range(10)))
    kv.allocate_slots(a, 10)
    b = _req("b", list(range(8)) + [50, 51, 52])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_ids("b")[:2] == [0, 1] and kv.pool.blocks[0].ref_cnt == 2
    kv.free(a)
    assert kv.pool.blocks[0].ref_cnt == 1 and kv.pool.blocks[2].ref_cnt == 0


def test_fork_then_copy_on_write_of_partial_tail():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    parent = _req("p", list(range(6)), n=2)
    kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1, "p#1")
    kv.fork(parent, child)
    assert [b.ref_cnt for b in kv.block_tables["p"]] == [2, 2]
    for r, tok in ((parent, 7), (child, 8)):
        r.append_token(tok)
        assert kv.allocate_slots(r, 1)
    copies = kv.take_pending_copies()
    # The parent wrote first and copied the shared tail; the child then owned it alone.
    assert copies == [(1, 2)]
    assert kv.block_ids("p") == [0, 2] and kv.block_ids("p#1") == [0, 1]
    assert kv.pool.blocks[0].ref_cnt == 2 and kv.pool.blocks[1].ref_cnt == 1


def test_partitioned_pool_keeps_each_request_in_one_partition():
    """AFD: each attention rank holds one range of block ids; a request lives in one, new ones
    go to the emptiest, prefix hits pull a request into the hits' partition, and a request that
    does not fit its partition waits even when the other has room."""
    kv = KVCacheManager(BlockPool(8, partitions=2), block_size=4)
    a = _req("a", list(range(10)))
    assert kv.allocate_slots(a, 10) and kv.block_ids("a") == [0, 1, 2]  # partition 0 (tie: first)
    b = _req("b", [70 + i for i in range(6)])
    assert kv.allocate_slots(b, 6) and kv.block_ids("b") == [4, 5]  # partition 1: more free
    c = _req("c", list(range(8)) + [60])  # shares a's first two blocks
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert kv.allocate_slots(c, 1, hits) and kv.block_ids("c") == [0, 1, 3]  # with its hits
    a.num_computed_tokens = 10
    for t in range(3):
        a.append_token(90 + t)
    # Partition 0 is full (blocks 0-3); partition 1 has 2 free, but a's blocks are in 0.
    assert kv.pool.num_free_in(0) == 0 and kv.pool.num_free_in(1) == 2
    assert not kv.allocate_slots(a, 3)
    kv.free(b)
    d = _req("d", [80 + i for i in range(16)])
    assert kv.can_ever_fit(16) and not kv.can_ever_fit(17)  # one partition's 4 blocks
    assert kv.allocate_slots(d, 16) and kv.block_ids("d") == [6, 7, 5, 4]  # LRU within 1 (tails freed first)


def test_prefix_chain_stops_at_a_partition_change():
    kv = KVCacheManager(BlockPool(8, partitions=2), block_size=4)
    x = _req("x", list(range(4)))
    y = _req("y", list(range(8)))
    assert kv.allocate_slots(x, 4)  # block 0 (partition 0) caches the first 4 tokens
    assert kv.allocate_slots(y, 8)  # admitted with no hits: partition 1, blocks 4 and 5
    z = _req("z", list(range(8)) + [1])
    hits, _ = kv.get_computed_blocks(z)
    # Block 4's twin (block 0) won the first hash; block 5 holds the second, in partition 1.
    assert [h.block_id for h in hits] == [0]
