"""Block pool: ids handed out in free-queue order, ref counts, LRU eviction of cached blocks."""

import pytest

from fapool.core.block_pool import BlockPool, hash_block_tokens


def test_allocation_order_and_ref_counts():
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    assert [b.block_id for b in a] == [0, 1] and all(b.ref_cnt == 1 for b in a)
    assert pool.num_free_blocks == 2
    pool.touch(a[:1])
    assert a[0].ref_cnt == 2
    pool.free_blocks(a)
    assert a[0].ref_cnt == 1 and a[1].ref_cnt == 0 and pool.num_free_blocks == 3
    with pytest.raises(ValueError, match="only 3 free"):
        pool.get_new_blocks(4)


def test_double_free_is_caught():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([b])


def test_freed_cached_block_stays_findable_until_reused_lru_order():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    h = [hash_block_tokens(None, [i]) for i in range(3)]
    for b, hh in zip(blocks, h):
        pool.cache_block(b, hh)
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])  # queue order: 2, 0, 1
    assert pool.lookup(h[0]) is blocks[0]
    pool.touch([blocks[0]])  # revived: leaves the free queue
    assert pool.num_free_blocks == 2
    (fresh,) = pool.get_new_blocks(1)
    assert fresh is blocks[2] and pool.lookup(h[2]) is None  # evicted the least recently freed
    assert pool.lookup(h[1]) is blocks[1]


def test_chained_hash_depends_on_prefix():
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(hash_block_tokens(None, [0]), [1, 2])
    assert hash_block_tokens(7, (1, 2)) == hash_block_tokens(7, [1, 2])
