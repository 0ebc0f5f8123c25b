"""Sparse decode (seed 003) inside the attention pool (seed 000): the driver selects, every
holder attends the chosen blocks it stores.

A pooled sequence's blocks lie on several holders (the driver's local blocks, then segments on
attention ranks), so no holder can pick a row's top blocks alone, and a top-k per holder is not
the single process's choice. The driver therefore keeps the key summaries (kmin/kmax) of every
block, its own and the pool's, in one summary table per layer, from the new keys it computes
anyway; it scores and selects exactly as the single-process sparse decode does and sends each
attention rank, with the query rows, the pages it chose among those the rank stores (per KV
head: in head mode only the rank's heads). Each holder attends its pages and the partials merge
by lse into attention over the chosen union: the single process's result. The selection reads
summaries (1/block_size of the KV) on the driver; the KV reads happen where the KV lives.

Summary table rows: the driver's blocks first, then each attention worker's blocks (of a
segment's first holder: every holder of a segment stores the same keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.attention.sparse import SparseGate, attend_selected, decode_block_scores
from fapool.config import EngineConfig
from fapool.sparse.profile import SparseProfile
from fapool.sparse.selection import budget_blocks_batched, pages_in_range, select_block_indices
from fapool.worker.step_plan import MicroBatchPlan


@dataclass
class Holding:
    """The chosen blocks one holder gets for some decode rows: row rows[e] stores its blocks
    lo[e] <= i < hi[e] at pages table[e, i - lo[e]]; at most `width` per head."""

    rows: torch.Tensor | None  # [E] decode row of each entry (None: every row, in order)
    lo: torch.Tensor
    hi: torch.Tensor
    table: torch.Tensor  # [E, W]
    width: int
    heads: torch.Tensor | None = None  # the holder's KV heads (None: all)


@dataclass
class DecodeRows:
    """A micro-batch's decode rows while the gate is open, the same for every layer of a step."""

    token_list: list[int]  # token index of each row
    tokens: torch.Tensor  # [B] the same, on the device
    num_kv: torch.Tensor  # [B] visible KV entries
    num_blocks: torch.Tensor  # [B]
    table: torch.Tensor  # [B, N] int32 summary-table rows of each row's blocks
    order: torch.Tensor | None  # [B, N] int32 1..N: block index + 1 (the Triton selection's pages)
    budgets: torch.Tensor  # [layers, B, Hkv] blocks
    width: int  # the largest budget
    local: Holding
    remote: dict[int, Holding]  # attention worker -> its share


@dataclass
class SparseBatch:
    """One micro-batch's sparse work: the summary update (every step, so the summaries are
    complete when the gate opens) and, with the gate open, the decode rows."""

    key_rows: torch.Tensor  # token rows whose keys enter the summaries
    blocks: torch.Tensor  # [U] summary rows they touch
    inverse: torch.Tensor  # [len(key_rows)] index into blocks
    fresh: torch.Tensor  # [U] bool: the step writes the block's first entry (reset, not extend)
    decode: DecodeRows | None


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(map(len, rows), default=0))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


class PoolSparse:
    """The driver's key summaries of every block and the per-step selection plans."""

    def __init__(
        self,
        config: EngineConfig,
        local_blocks: int,
        worker_blocks: int,
        kv_heads: dict[int, list[int]],
        device: torch.device,
        dtype: torch.dtype,
        triton: bool = False,  # select with the Triton kernels (as the single process's Triton backend)
    ) -> None:
        m = config.model
        self.triton = triton
        profile = SparseProfile.load(config.sparse_attention)
        self.rules = [profile.rule(i) for i in range(m.num_hidden_layers)]
        self.min_blocks = profile.min_blocks
        self.gate = SparseGate(config.sparse_min_context)
        self.block_size = config.cache.block_size
        self.device = device
        self.base = {0: 0, **{w: local_blocks + (w - 1) * worker_blocks for w in kv_heads}}
        self.heads = {
            w: None if len(hs) == m.num_key_value_heads else torch.tensor(hs, device=device)
            for w, hs in kv_heads.items()
        }
        self._budgets: dict[int, torch.Tensor] = {}  # visible blocks -> [layers, Hkv] budgets (host)
        shape = (local_blocks + len(kv_heads) * worker_blocks, m.num_key_value_heads, m.head_dim)
        self.kmin = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.rules]
        self.kmax = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.rules]

    # Plans ----------------------------------------------------------------------------------
    def plan(self, mb: MicroBatchPlan, pool_start: int, max_kv_len: int) -> SparseBatch:
        """The micro-batch's summary update and, when the step's longest KV opens the gate,
        its decode rows. Marks the sparse entries in the routes' WorkerBatches (before they
        are sent)."""
        bs, dev = self.block_size, self.device
        key_rows: list[int] = []
        slots: list[int] = []
        decode: dict[int, int] = {}  # token -> decode row
        num_kv, tables, local_tables = [], [], []
        active = self.gate.active(max_kv_len)
        offset = 0
        for s in mb.scheduled:
            c, n = s.num_computed_tokens, s.num_new_tokens
            end = c + n
            local_len = min(end, pool_start) if s.segments else end
            for p in range(c, min(end, local_len)):
                key_rows.append(offset + p - c)
                slots.append(s.block_ids[p // bs] * bs + p % bs)
            for seg in s.segments:
                first = seg.holders[0]
                base = self.base[first.worker]
                for p in range(max(c, seg.start), min(end, seg.start + seg.num_blocks * bs)):
                    rel = p - seg.start
                    key_rows.append(offset + p - c)
                    slots.append((base + first.block_ids[rel // bs]) * bs + rel % bs)
            if active and n == 1:
                decode[offset] = len(num_kv)
                num_kv.append(end)  # a decode query at position c sees 0..c
                local = list(s.block_ids[: -(-local_len // bs)])
                local_tables.append(local)
                tables.append(local + [self.base[g.holders[0].worker] + b for g in s.segments for b in g.holders[0].block_ids])
            offset += n
        blocks: dict[int, int] = {}
        inverse, fresh = [], []
        for slot in slots:
            b = slot // bs
            if b not in blocks:
                blocks[b] = len(blocks)
                fresh.append(False)
            inverse.append(blocks[b])
            fresh[blocks[b]] |= slot % bs == 0
        batch = SparseBatch(
            torch.tensor(key_rows, dtype=torch.long, device=dev),
            torch.tensor(list(blocks), dtype=torch.long, device=dev),
            torch.tensor(inverse, dtype=torch.long, device=dev),
            torch.tensor(fresh, dtype=torch.bool, device=dev),
            None,
        )
        if decode:
            batch.decode = self._decode_rows(mb, decode, num_kv, tables, local_tables)
        return batch

    def _decode_rows(self, mb: MicroBatchPlan, decode: dict[int, int], num_kv, tables, local_tables) -> DecodeRows:
        bs, dev = self.block_size, self.device
        kv = torch.tensor(num_kv, dtype=torch.long)
        budgets = torch.stack([self._budgets_at(-(-n // bs)) for n in num_kv], dim=1)  # [layers, B, Hkv]
        width = max(1, int(budgets.max()))
        local_nb = [len(t) for t in local_tables]
        local = Holding(
            None,
            torch.zeros(len(num_kv), dtype=torch.long, device=dev),
            torch.tensor(local_nb, dtype=torch.long, device=dev),
            _padded(local_tables, dev),
            max(1, min(width, max(local_nb))),
        )
        remote = {}
        for w, route in mb.routes.items():
            batch = route.batch
            batch.sparse_entries, batch.sparse_pages = [], 0
            rows, lo, hi, pages = [], [], [], []
            first = 0
            for i, e in enumerate(batch.entries):
                token = route.q_rows[first]
                first += e.num_queries
                if e.num_queries != 1 or token not in decode:
                    continue
                batch.sparse_entries.append(i)
                rows.append(decode[token])
                lo.append(e.kv_start // bs)
                hi.append(lo[-1] + -(-e.kv_len // bs))
                pages.append(list(e.block_ids))
            if not rows:
                continue
            batch.sparse_pages = max(1, min(width, max(h - l for l, h in zip(lo, hi))))
            remote[w] = Holding(
                torch.tensor(rows, dtype=torch.long, device=dev),
                torch.tensor(lo, dtype=torch.long, device=dev),
                torch.tensor(hi, dtype=torch.long, device=dev),
                _padded(pages, dev),
                batch.sparse_pages,
                self.heads[w],
            )
        table = _padded(tables, dev).to(torch.int32)
        order = None
        if self.triton:
            n = table.shape[1]
            order = torch.arange(1, n + 1, dtype=torch.int32, device=dev).repeat(table.shape[0], 1)
        return DecodeRows(
            list(decode),
            torch.tensor(list(decode), dtype=torch.long, device=dev),
            kv.to(dev),
            ((kv + bs - 1) // bs).to(dev),
            table,
            order,
            budgets.to(dev),
            width,
            local,
            remote,
        )

    def _budgets_at(self, num_blocks: int) -> torch.Tensor:
        """Every layer's budgets for a row of `num_blocks` blocks: they change once a block, so
        they are computed once per block count, not per layer and step."""
        got = self._budgets.get(num_blocks)
        if got is None:
            kv = torch.tensor([num_blocks * self.block_size])
            got = torch.cat([budget_blocks_batched(rule, kv, self.block_size, self.min_blocks) for rule in self.rules])
            self._budgets[num_blocks] = got
        return got

    # Per layer --------------------------------------------------------------------------------
    @torch.no_grad()
    def select(self, layer: int, q: torch.Tensor, k: torch.Tensor, batch: SparseBatch) -> torch.Tensor | None:
        """Put the layer's new keys into the summaries; with decode rows, choose their blocks:
        [B, Hkv, width] block indices (select_block_indices), as the single process would."""
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        if batch.key_rows.numel():
            keys = k.index_select(0, batch.key_rows)
            index = batch.inverse.view(-1, 1, 1).expand_as(keys)
            shape = (batch.blocks.numel(), *keys.shape[1:])
            lo = torch.full(shape, float("inf"), dtype=keys.dtype, device=keys.device)
            hi = torch.full(shape, float("-inf"), dtype=keys.dtype, device=keys.device)
            lo = lo.scatter_reduce(0, index, keys, "amin")
            hi = hi.scatter_reduce(0, index, keys, "amax")
            fresh = batch.fresh.view(-1, 1, 1)
            kmin[batch.blocks] = torch.where(fresh, lo, torch.minimum(kmin[batch.blocks], lo))
            kmax[batch.blocks] = torch.where(fresh, hi, torch.maximum(kmax[batch.blocks], hi))
        d = batch.decode
        if d is None:
            return None
        q = q.index_select(0, d.tokens)
        if d.order is None:
            score = decode_block_scores(q, kmin, kmax, d.table)
            return select_block_indices(score, d.num_blocks, d.budgets[layer], d.width)
        from fapool.sparse.triton_select import select_blocks_triton

        picked, _ = select_blocks_triton(
            q, kmin, kmax, d.table, d.num_kv, d.budgets[layer], self.block_size, d.width,
            self.min_blocks, page_tables=d.order,
        )
        # Block index + 1, zero-padded -> select_block_indices' layout (padding N).
        return torch.where(picked > 0, picked.long() - 1, d.table.shape[1])

    def pages(self, chosen: torch.Tensor, d: DecodeRows, h: Holding) -> tuple[torch.Tensor, torch.Tensor]:
        """One holder's pages and lens (pages_in_range) of the chosen blocks."""
        num_kv = d.num_kv
        if h.rows is not None:
            chosen, num_kv = chosen.index_select(0, h.rows), num_kv.index_select(0, h.rows)
        if h.heads is not None:
            chosen = chosen.index_select(1, h.heads)
        return pages_in_range(chosen, num_kv, h.table, h.lo, h.hi, self.block_size, h.width)

    def copy_blocks(self, local: list[tuple[int, int]], pool: list[tuple[int, int, int]]) -> None:
        """Copy-on-write: summaries follow the KV (local (src, dst); pool (worker, src, dst))."""
        pairs = list(local) + [(self.base[w] + s, self.base[w] + d) for w, s, d in pool]
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for kmin, kmax in zip(self.kmin, self.kmax):
            kmin[dst] = kmin[src]
            kmax[dst] = kmax[src]


def uses_triton(backend) -> bool:
    """A Triton attention backend (or a sparse backend over one): the Triton sparse kernels."""
    return getattr(getattr(backend, "dense", backend), "name", "") == "triton"


def attend_pages(backend, q, k_cache, v_cache, pages, lens, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over per-head pages (pages_in_range's layout): the Triton work-balanced kernel
    next to a Triton backend, else torch. -> (out, lse float32)."""
    if uses_triton(backend):
        from fapool.sparse.triton_balanced_decode import balanced_sparse_decode

        return balanced_sparse_decode(q, k_cache, v_cache, pages, lens, scale)
    return attend_selected(q, k_cache, v_cache, pages, lens, scale)
