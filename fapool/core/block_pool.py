"""The KV blocks of one worker: a free queue in eviction order, reference counts, and the
prefix cache (hash of a full block's tokens, chained through its predecessors -> block).

A block with ref_cnt 0 sits in the free queue but keeps its hash and contents until it is
handed out again, so a later request with the same prefix can still hit it (vLLM v1's design).

Partitions: the ids may be cut into equal ranges held by different ranks (attention-FFN
disaggregation: each attention rank holds one range). Each range has its own free queue, and a
request takes every block from one range (KVCacheManager).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

LOCAL_WORKER = 0


@dataclass(eq=False)
class KVBlock:
    block_id: int
    worker: int = LOCAL_WORKER  # where the block lives; the attention pool places blocks elsewhere
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are known

    def __repr__(self) -> str:
        return f"KVBlock({self.worker}:{self.block_id}, ref={self.ref_cnt}, hash={self.block_hash is not None})"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash: a block's identity is its tokens and everything before it. Ints hash
    deterministically in CPython, so the same prefix hashes the same in every process."""
    return hash((parent_hash, tuple(token_ids)))


class BlockPool:
    def __init__(
        self, num_blocks: int, worker: int = LOCAL_WORKER, enable_caching: bool = True, partitions: int = 1
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        if partitions < 1 or num_blocks % partitions:
            raise ValueError(f"{num_blocks} blocks cannot be cut into {partitions} equal partitions")
        self.worker = worker
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i, worker) for i in range(num_blocks)]
        self.partition_size = num_blocks // partitions
        # Per partition; front = evicted first. Freed blocks go to the back (LRU).
        self._free: list[OrderedDict[int, KVBlock]] = [
            OrderedDict((b.block_id, b) for b in self.blocks[p * self.partition_size : (p + 1) * self.partition_size])
            for p in range(partitions)
        ]
        self._cached: dict[int, KVBlock] = {}
        self.num_cache_hits = 0  # blocks served from the prefix cache
        self.num_cache_queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_partitions(self) -> int:
        return len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return sum(len(f) for f in self._free)

    def num_free_in(self, partition: int) -> int:
        return len(self._free[partition])

    def partition_of(self, block: KVBlock) -> int:
        return block.block_id // self.partition_size

    def emptiest_partition(self) -> int:
        """Where a new request goes: the partition with the most free blocks (the first on a tie)."""
        return max(range(len(self._free)), key=lambda p: (len(self._free[p]), -p))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def get_new_blocks(self, n: int, partition: int = 0) -> list[KVBlock]:
        """Take n blocks off a partition's free queue (evicting their cached identity), ref_cnt 1 each."""
        free = self._free[partition]
        if n > len(free):
            raise ValueError(f"cannot allocate {n} blocks, only {len(free)} free")
        out = []
        for _ in range(n):
            _, block = free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take a reference on cached blocks a new request reuses."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[self.partition_of(block)][block.block_id]
            block.ref_cnt += 1

    def cache_block(self, block: KVBlock, block_hash: int) -> None:
        """Record a full block under its hash. First writer wins: a duplicate stays uncached."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def free_blocks(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the back of the free queue in the
        order given (callers pass a sequence's blocks tail first, so tails are evicted first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[self.partition_of(block)][block.block_id] = block

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
