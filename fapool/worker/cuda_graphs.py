"""CUDA graphs for decode steps: one graph per (padded batch size, decode split count, sparse
gate choice).

A decode step of a small model is a few hundred short kernels; launched one by one from Python
the host takes longer than the GPU (about 77 us per attention call alone, measured on an H100).
Replaying a captured graph launches them all at once. A graph reads fixed addresses, so the
step's inputs go through static buffers:

    host (pinned)                     device (static)             inside the graph
    vec [5, max_batch] int64   --->   vec: token ids, positions,  query_pos_start, kv_lens
                                           slots, kv lens, src      (int32 casts)
    table [max_batch, max_blocks] -> table (block tables)        block_tables[:batch]
    sampling ints / floats     --->   the same                    sampled [max_batch] int64
      [3, max_batch] (SamplingBatch)                              (fapool.layers.sampler)

Two H2D copies a step: vec and the sampling rows are views of one buffer (RowBuffers). Rows
past the real batch are padding: slot -1 (no KV written), kv len 0 (the decode kernel writes
zeros and lse -inf), token 0, greedy sampling. Sampling is one Triton
launch inside the graph (fapool.layers.triton_sampler), whatever each row asks.

Async scheduling: a row whose input token was sampled by the step still in flight has src >= 0,
its row in that step's device tokens; one gather before the replay puts it into the token ids
(outside the graph, so a capture's warm-up run, which rewrites `sampled`, cannot change it), a
plain copy when every row reads its own row (an unchanged batch).

Per-step host work is O(batch), not O(context): each row's block table is kept in the pinned
buffer and only the entries from the request's previous last block on are rewritten (the
KV manager's invariant: only the tail block of a table is ever written, so only it can be
replaced by copy-on-write; a preemption bumps the request's preemption count, which makes
the row stale). Tokens are read by position, never through `Request.all_token_ids`, which
concatenates the whole sequence.

The split count of the decode kernel is a launch argument frozen into the graph, so each graph
is captured with the split count `auto_num_splits` picks for its padded batch and the step's
longest context (and, for an 8-bit cache, the kernel `fp8_warp_split` picks for that context); a
step whose choice differs uses (or captures) the graph of that count and kernel. Graphs
are captured lazily, on first use, into one shared memory pool (they never run concurrently).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from fapool.attention.metadata import AttentionMetadata
from fapool.core.scheduler import ScheduledRequest
from fapool.layers.sampler import sample_tokens
from fapool.layers.sampling_batch import Mode, SamplingBatch


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then steps of 8 to 64, 16 to 128, 32 beyond, up to the
    first size >= max_num_seqs."""
    sizes = [1]
    while sizes[-1] < max_num_seqs:
        last = sizes[-1]
        sizes.append(last * 2 if last < 8 else last + (8 if last < 64 else 16 if last < 128 else 32))
    return sizes


class DecodeInputs:
    """Host side of the static buffers: fills the pinned arrays for a decode batch.

    CPU-testable (pinned memory only when `pin` is true)."""

    IDS, POS, SLOT, KV_LEN, SRC = range(5)

    def __init__(
        self, max_batch: int, max_blocks: int, block_size: int, pin: bool, vec: torch.Tensor | None = None
    ) -> None:
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.block_size = block_size
        # `vec`: [5, max_batch] int64 given by the caller (a view of a larger buffer), else its own.
        self.vec = torch.zeros((5, max_batch), dtype=torch.int64, pin_memory=pin) if vec is None else vec
        self.table = torch.zeros((max_batch, max_blocks), dtype=torch.int32, pin_memory=pin)
        self._vec = self.vec.numpy()
        self._table = self.table.numpy()
        # Which request (object, preemption count) each table row holds, and its length.
        self._owner: list[object | None] = [None] * max_batch
        self._owner_preempts = [0] * max_batch
        self._row_len = [0] * max_batch
        self.rows_rewritten = 0  # entries written into the table (tests, profiling)
        # After fill: every row i reads row i of the in-flight step's tokens (async decode of an
        # unchanged batch), so the gather is one copy.
        self.src_in_order = False

    def fill(
        self, scheduled: Sequence[ScheduledRequest], padded: int, prev_rows: dict[str, int] | None = None
    ) -> tuple[int, bool]:
        """Write a batch of one-token steps into rows [0, padded). A token the host does not
        have yet (async scheduling) is read from row `prev_rows[request_id]` of the in-flight
        step's tokens. Returns the longest KV and whether any row reads such a token."""
        n = len(scheduled)
        if not 0 < n <= padded <= self.max_batch:
            raise ValueError(f"batch of {n} padded to {padded} does not fit {self.max_batch} rows")
        bs, max_blocks = self.block_size, self.max_blocks
        vec, table = self._vec, self._table
        owner, owner_preempts, row_len = self._owner, self._owner_preempts, self._row_len
        pos = [0] * n
        toks = [0] * n
        slots = [0] * n
        src = [-1] * n
        gather = False
        in_order = True  # every row i reads row i of the in-flight tokens
        rewritten = 0
        # Single-entry table writes (a decode step's usual one per row), applied in one go.
        one_rows: list[int] = []
        one_cols: list[int] = []
        one_vals: list[int] = []
        for i, s in enumerate(scheduled):
            req, p, ids = s.request, s.num_computed_tokens, s.block_ids
            pos[i] = p
            j = p - len(req.prompt_token_ids)
            if j < 0:
                toks[i] = req.prompt_token_ids[p]
                in_order = False
            elif j < len(req.output_token_ids):
                toks[i] = req.output_token_ids[j]
                in_order = False
            else:  # sampled by the step in flight
                row = None if prev_rows is None else prev_rows.get(req.request_id)
                if row is None:
                    raise RuntimeError(f"request {req.request_id}: input token is neither known nor in flight")
                src[i] = row
                gather = True
                if row != i:
                    in_order = False
            slots[i] = ids[p // bs] * bs + p % bs
            num_blocks = len(ids)
            if num_blocks > max_blocks:
                raise ValueError(f"a block table of {num_blocks} blocks exceeds {max_blocks}")
            preempts = req.metrics.num_preemptions
            old = row_len[i]
            if owner[i] is req and owner_preempts[i] == preempts and 0 < old <= num_blocks:
                start = old - 1  # the old tail block may have been replaced (copy-on-write)
            else:
                start = 0
                owner[i], owner_preempts[i] = req, preempts
            if num_blocks - start == 1:
                one_rows.append(i)
                one_cols.append(start)
                one_vals.append(ids[start])
            else:
                table[i, start:num_blocks] = ids[start:]
            rewritten += num_blocks - start
            row_len[i] = num_blocks
        if one_rows:
            table[one_rows, one_cols] = one_vals
        self.src_in_order = gather and in_order
        self.rows_rewritten += rewritten
        vec[self.IDS, :n] = toks
        vec[self.POS, :n] = pos
        vec[self.SLOT, :n] = slots
        vec[self.KV_LEN, :n] = vec[self.POS, :n] + 1
        vec[self.SRC, :n] = src
        if padded > n:
            vec[:, n:padded] = 0
            vec[self.SLOT, n:padded] = -1
            vec[self.SRC, n:padded] = -1
        return max(pos) + 1, gather


class RowBuffers:
    """Views of one byte buffer: DecodeInputs.vec [5, B] int64, then the sampling parameters
    (SamplingBatch's ints [3, B] int64 and floats [3, B] float32)."""

    @staticmethod
    def nbytes(max_batch: int) -> int:
        return (5 + 3) * 8 * max_batch + 3 * 4 * max_batch

    def __init__(self, buf: torch.Tensor, max_batch: int) -> None:
        a, b = 5 * 8 * max_batch, 8 * 8 * max_batch
        self.vec = buf[:a].view(torch.int64).view(5, max_batch)
        self.ints = buf[a:b].view(torch.int64).view(3, max_batch)
        self.floats = buf[b : b + 3 * 4 * max_batch].view(torch.float32).view(3, max_batch)


@contextlib.contextmanager
def pinned_splits(backend, num_splits: int, warp_split: bool = False):
    """Fix the Triton backend's decode split count and kernel while a graph is captured."""
    old = backend.num_splits, backend.warp_split
    backend.num_splits, backend.warp_split = num_splits, warp_split
    try:
        yield
    finally:
        backend.num_splits, backend.warp_split = old


@contextlib.contextmanager
def pinned_gate(gate, active: bool | None):
    """Fix a sparse backend's gate choice (fapool.attention.sparse.SparseGate) during a capture."""
    if gate is None:
        yield
        return
    old = gate.pinned
    gate.pinned = active
    try:
        yield
    finally:
        gate.pinned = old


class DecodeGraphs:
    """Captures and replays decode steps of `model` over `kv_caches` (Triton backend only)."""

    def __init__(
        self, model, backend, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int
    ) -> None:
        from fapool.attention.triton_decode import auto_num_splits, fp8_warp_split

        self._auto_num_splits = auto_num_splits
        self._fp8_warp_split = fp8_warp_split
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        k_cache = kv_caches[0][0]
        self.device = k_cache.device
        self.num_kv_heads, self.head_dim = k_cache.shape[2], k_cache.shape[3]
        self.elem_size = k_cache.element_size()
        self.int8 = k_cache.dtype == torch.int8
        max_blocks = -(-max_model_len // block_size)
        # The per-row inputs (DecodeInputs.vec) and sampling parameters (SamplingBatch's layout)
        # share one pinned buffer and one static device copy: one H2D copy a step for both.
        mb = self.max_batch
        self._rows_host = torch.zeros(RowBuffers.nbytes(mb), dtype=torch.uint8, pin_memory=True)
        self._rows = torch.zeros_like(self._rows_host, device=self.device)
        host, dev = RowBuffers(self._rows_host, mb), RowBuffers(self._rows, mb)
        self.inputs = DecodeInputs(mb, max_blocks, block_size, pin=True, vec=host.vec)
        self._vec = dev.vec
        self._table = torch.zeros_like(self.inputs.table, device=self.device)
        self._query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=self.device)
        self._kv_start = torch.zeros(self.max_batch, dtype=torch.int32, device=self.device)
        self.sampled = torch.zeros(self.max_batch, dtype=torch.int64, device=self.device)
        self._s_ints_host, self._s_floats_host = host.ints, host.floats
        self._s_ints, self._s_floats = dev.ints, dev.floats
        self.vocab_size = model.config.vocab_size
        self.last_logprobs: int | None = None  # the last run's logprobs count (SamplingBatch.logprobs)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self._pool = torch.cuda.graph_pool_handle()
        # A sparse backend's gate (None for a dense one): sparse and dense steps are separate graphs.
        self.gate = getattr(backend, "gate", None)
        self.graphs: dict[tuple[int, int, bool, bool | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # (padded batch, splits, warp-split kernel, sparse gate choice or None) of the last run
        self.last_key: tuple[int, int, bool, bool | None] | None = None

    def padded_size(self, num_seqs: int) -> int | None:
        if num_seqs > self.max_batch:
            return None
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def run(
        self,
        scheduled: Sequence[ScheduledRequest],
        prev_tokens: torch.Tensor | None = None,
        prev_rows: dict[str, int] | None = None,
        sampling: list | None = None,
    ) -> torch.Tensor:
        """Logits [len(scheduled), vocab] float32 of a decode-only batch; tokens sampled from
        them land in `sampled[:len(scheduled)]` (`sampling`: a row per scheduled request, as
        SamplingBatch.fill_host takes them; default greedy). Both are views of the graph's
        outputs: read them before the next step. `prev_tokens`/`prev_rows`: the in-flight
        step's tokens (async scheduling)."""
        n = len(scheduled)
        padded = self.padded_size(n)
        if padded is None:
            raise ValueError(f"a decode batch of {n} exceeds the largest graph ({self.max_batch})")
        # The pinned buffers are reused: the previous step's copy out of them must be done.
        self._copied.synchronize()
        max_kv, gather = self.inputs.fill(scheduled, padded, prev_rows)
        rows = (sampling or [None] * n) + [None] * (padded - n)  # padding: greedy
        _, self.last_logprobs = SamplingBatch.fill_host(rows, self.vocab_size, self._s_ints_host, self._s_floats_host)
        self._rows.copy_(self._rows_host, non_blocking=True)  # vec and the sampling parameters
        self._table[:padded].copy_(self.inputs.table[:padded], non_blocking=True)
        self._copied.record()
        if gather:
            assert prev_tokens is not None
            ids = self._vec[DecodeInputs.IDS, :n]
            if self.inputs.src_in_order:
                ids.copy_(prev_tokens[:n])
            else:
                src = self._vec[DecodeInputs.SRC, :n]
                ids.copy_(torch.where(src >= 0, prev_tokens.index_select(0, src.clamp(min=0)), ids))
        warp_split = self.elem_size == 1 and self._fp8_warp_split(max_kv)
        splits = self._auto_num_splits(
            padded, self.num_kv_heads, max_kv, self.head_dim, self.elem_size, self.device, warp_split=warp_split,
            int8=self.int8,
        )
        key = (padded, splits, warp_split, None if self.gate is None else self.gate.active(max_kv))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        graph, logits = entry
        self.last_key = key
        graph.replay()
        return logits[:n]

    def _forward(self, batch: int) -> torch.Tensor:
        vec = self._vec
        meta = AttentionMetadata(
            query_start_loc=self._query_start_loc[: batch + 1],
            query_pos_start=vec[DecodeInputs.POS, :batch].to(torch.int32),
            kv_lens=vec[DecodeInputs.KV_LEN, :batch].to(torch.int32),
            kv_start=self._kv_start[:batch],
            block_tables=self._table[:batch],
            slot_mapping=vec[DecodeInputs.SLOT, :batch],
            max_query_len=1,
            max_kv_len=self.max_model_len,  # the split count is pinned: unused
            query_lens_cpu=[1] * batch,
            kv_lens_cpu=[self.max_model_len] * batch,
        )
        hidden = self.model(
            vec[DecodeInputs.IDS, :batch], vec[DecodeInputs.POS, :batch], self.kv_caches, meta
        )
        logits = self.model.compute_logits(hidden)
        # One Triton launch whatever the rows ask (greedy rows stop after their argmax pass).
        sampling = SamplingBatch(self._s_ints[:, :batch], self._s_floats[:, :batch], Mode.SORT, None)
        self.sampled[:batch].copy_(sample_tokens(logits, sampling))
        return logits

    def _capture(
        self, batch: int, splits: int, warp_split: bool, sparse: bool | None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The buffers already hold this step's batch: the warm-up run computes it (compiling
        # kernels, creating cuBLAS workspaces) and writes the same K/V the replay will write.
        with pinned_splits(self.backend, splits, warp_split), pinned_gate(self.gate, sparse):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(batch)
        return graph, logits

    def time_replay(
        self, batch: int, splits: int, warp_split: bool = False, sparse: bool | None = None, iters: int = 20
    ) -> float:
        """Median GPU time (ms) of one replay of a captured graph (benchmarks). Replaying
        recomputes the batch in the buffers and rewrites its K/V: call it only right after a
        step of that very graph (`last_key`), while the batch's blocks are still its own."""
        key = (batch, splits, warp_split, sparse)
        if key != self.last_key:
            raise ValueError(f"time_replay of {key} after a step of {self.last_key}")
        graph, _ = self.graphs[key]
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))
