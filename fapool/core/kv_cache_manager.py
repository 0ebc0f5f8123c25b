"""Request-level KV cache API over a BlockPool: prefix-cache lookup, slot allocation with
copy-on-write, fork for parallel sampling, and free.

Block table of a request, tokens laid out left to right (block_size 4 here):

    | b0: t0 t1 t2 t3 | b1: t4 t5 t6 t7 | b2: t8 t9 __ __ |
      full, hashed      full, hashed      partial: the only block new tokens are written into

Only the partial tail block can be written, so only it needs copy-on-write when shared.

With an attention pool, the local table stops at the pool threshold and the PoolManager
places the rest on attention workers; this class keeps both in step (all or nothing).

With a partitioned BlockPool (each partition on its own attention rank), a request takes all
its blocks from one partition: the one its prefix-cache hits are in, else the emptiest.
"""

from __future__ import annotations

from collections.abc import Sequence

from fapool.core.block_pool import BlockPool, KVBlock, hash_block_tokens
from fapool.core.pool_manager import PoolManager, Segment
from fapool.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, pool_manager: PoolManager | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.pool_manager = pool_manager
        self.block_tables: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of each request already hashed
        self._hashes: dict[str, list[int]] = {}  # their chained hashes
        self._pending_copies: list[tuple[int, int]] = []  # (src, dst) block ids, CoW
        self._ids: dict[str, list[int]] = {}  # block_tables as ids
        self._partition: dict[str, int] = {}  # request -> the BlockPool partition of its blocks

    # Queries ------------------------------------------------------------------------------
    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        pm = self.pool_manager
        if pm is None or not pm.enabled:
            return self.num_blocks_needed(num_tokens) <= self.pool.partition_size
        local = self.num_blocks_needed(min(num_tokens, pm.pool_start))
        return local <= self.pool.num_blocks and pm.can_ever_fit(num_tokens)

    def _local_limit(self, request_id: str) -> int | None:
        """Positions at or past this go to the attention pool (None: everything local)."""
        pm = self.pool_manager
        if pm is None or not (pm.enabled or request_id in pm.segments):
            return None
        return pm.pool_start

    def pool_segments(self, request_id: str) -> list[Segment]:
        return self.pool_manager.segments_of(request_id) if self.pool_manager is not None else []

    def block_ids(self, request_id: str) -> list[int]:
        """The request's local block ids, kept up to date as blocks are added (so a step costs
        no work per block of context). Read-only: the manager owns the list."""
        return self._ids.get(request_id, [])

    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    # Allocation ---------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of the request's full blocks found in the prefix cache. At least one
        token is always left to compute (its logits give the next token), so a fully cached
        prompt gives back its last block."""
        if not self.pool.enable_caching or request.request_id in self.block_tables:
            return [], 0
        if request.prompt_logprobs is not None:  # every prompt position's logits are wanted
            return [], 0
        tokens = request.all_token_ids
        hits: list[KVBlock] = []
        parent = None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = hash_block_tokens(parent, tokens[start : start + self.block_size])
            block = self.pool.lookup(parent)
            # A chain's blocks may lie in different partitions when two requests filled the
            # same prefix at once; a request's blocks must share one.
            if block is None or (hits and self.pool.partition_of(block) != self.pool.partition_of(hits[0])):
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= len(tokens):
            hits.pop()
        self.pool.num_cache_queries += cdiv(len(tokens), self.block_size)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Make room for num_new_tokens more tokens after request.num_computed_tokens (plus any
        prefix-cache hits, which must be passed on the request's first allocation). Returns
        False, changing nothing, when the pool cannot supply the blocks."""
        rid = request.request_id
        table = self.block_tables.get(rid, [])
        if table and not computed_blocks and (self.pool_manager is None or self._local_limit(rid) is None):
            # The decode step's common case: the tokens fit the blocks held, the tail one unshared.
            bs = self.block_size
            computed = request.num_computed_tokens
            total = computed + num_new_tokens
            if total <= len(table) * bs and (num_new_tokens == 0 or table[computed // bs].ref_cnt == 1):
                known = len(request.prompt_token_ids) + len(request.output_token_ids)
                if min(total, known) // bs > self._num_hashed.get(rid, 0):  # a block fills: hash it
                    self._cache_full_blocks(request, table, total)
                return True
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        limit = self._local_limit(request.request_id)
        local_total = total if limit is None else min(total, limit)
        num_new_blocks = max(0, self.num_blocks_needed(local_total) - len(table) - len(computed_blocks))
        # The block the first new token lands in: if it exists and is shared, copy it first.
        tail_idx = num_computed // self.block_size
        writes_local = num_new_tokens > 0 and (limit is None or num_computed < limit)
        cow = writes_local and tail_idx < len(table) and table[tail_idx].ref_cnt > 1
        # Cached hits sitting in the free queue stop being free once touched.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        part = self._partition.get(request.request_id)
        if part is None:
            part = self.pool.partition_of(computed_blocks[0]) if computed_blocks else self.pool.emptiest_partition()
        if num_new_blocks + int(cow) + num_revived > self.pool.num_free_in(part):
            return False
        if limit is not None and total > limit:
            # Pool side first: its copy-on-write and allocation each leave a valid state
            # when they fail, and nothing local has changed yet.
            pm = self.pool_manager
            assert pm is not None
            if num_new_tokens > 0 and num_computed >= limit and pm.write_position_needs_copy(
                request.request_id, num_computed
            ):
                if not pm.copy_on_write(request.request_id, num_computed):
                    return False
            if not pm.allocate(request.request_id, total):
                return False

        ids = self._ids.get(request.request_id, [])
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table = list(computed_blocks)
            ids = [b.block_id for b in computed_blocks]
            self._hashes[request.request_id] = [b.block_hash for b in computed_blocks]  # type: ignore[misc]
            self._num_hashed[request.request_id] = len(computed_blocks)
            self.pool.num_cache_hits += len(computed_blocks)
        if cow:
            (fresh,) = self.pool.get_new_blocks(1, part)
            shared = table[tail_idx]
            self._pending_copies.append((shared.block_id, fresh.block_id))
            self.pool.free_blocks([shared])
            table[tail_idx] = fresh
            ids[tail_idx] = fresh.block_id
        new_blocks = self.pool.get_new_blocks(num_new_blocks, part)
        table.extend(new_blocks)
        ids.extend(b.block_id for b in new_blocks)
        self._partition[request.request_id] = part
        self.block_tables[request.request_id] = table
        self._ids[request.request_id] = ids
        self._cache_full_blocks(request, table, local_total)
        return True

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens: int) -> None:
        """Hash blocks that become full once the step's known tokens are written. Writes land
        before any read in the same step (every layer writes K/V before attending), so a
        request admitted in the same step may already share them."""
        if not self.pool.enable_caching:  # nothing would ever look the hashes up
            return
        rid = request.request_id
        done = self._num_hashed.get(rid, 0)
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= done:
            return
        hashes = self._hashes.setdefault(rid, [])
        parent = hashes[-1] if hashes else None
        bs = self.block_size
        for i in range(done, num_full):
            parent = hash_block_tokens(parent, request.token_slice(i * bs, (i + 1) * bs))
            hashes.append(parent)
            self.pool.cache_block(table[i], parent)
        self._num_hashed[rid] = num_full

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent (ref counts up); a shared partial tail
        is copied on the first write (allocate_slots)."""
        table = self.block_tables[parent.request_id]
        self.pool.touch(table)
        self.block_tables[child.request_id] = list(table)
        self._ids[child.request_id] = list(self._ids[parent.request_id])
        if parent.request_id in self._partition:
            self._partition[child.request_id] = self._partition[parent.request_id]
        self._num_hashed[child.request_id] = self._num_hashed.get(parent.request_id, 0)
        self._hashes[child.request_id] = list(self._hashes.get(parent.request_id, []))
        if self.pool_manager is not None:
            self.pool_manager.fork(parent.request_id, child.request_id)

    def free(self, request: Request) -> None:
        table = self.block_tables.pop(request.request_id, [])
        self._ids.pop(request.request_id, None)
        self._partition.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self.pool.free_blocks(list(reversed(table)))
        if self.pool_manager is not None:
            self.pool_manager.free(request.request_id)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def take_pool_copies(self) -> list[tuple[int, int, int]]:
        return self.pool_manager.take_pending_copies() if self.pool_manager is not None else []
