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
