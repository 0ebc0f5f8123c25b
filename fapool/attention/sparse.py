"""Head-adaptive sparse decode (seed 003): each KV head attends over its top-k KV blocks.

    SparseAttentionBackend(dense, kv_budget, min_blocks)   one per layer (budgets differ)

Torch path (CPU, or any non-Triton dense backend): decode tokens (one query per sequence)
whose budget is below their block count take the sparse path; every other token (prefill
chunks, short sequences, full budgets) goes to the wrapped dense backend unchanged, so a budget
covering all blocks gives the dense result bit for bit. (The Triton path: below.)

Block summaries (per block and KV head, the min and max of its keys; see
fapool.sparse.selection for why) are kept next to the cache and updated in `write_kv`: here
(torch) the blocks a step writes are recomputed, from offset 0 to the last offset written; the
Triton write extends them with the new keys. Copy-on-write copies them with the KV
(`copy_block_state`).

Sparse step, per decode sequence and KV head (torch here; shapes B seqs, H KV heads, G query
heads per KV head, N blocks, K = largest budget):
    score  [B, H, N]  = max over G of  q+ . kmax + q- . kmin     (upper bound of q . k)
    order  [B, H, N]  = sink, recent, then by score              (fapool.sparse.selection)
    gather [B, H, K*block_size, D] keys/values of the first k_h blocks of the order
    softmax over them -> (out, lse), exactly as dense attention over that subset.

On CUDA with the Triton backend the same step runs in Triton with no host sync, so decode
steps can be CUDA graphs (`graph_safe`): summaries (fapool.sparse.triton_summaries, fused with
the KV write), selection (fapool.sparse.triton_select: scores, then top-k + compaction;
budgets are the profile's per-head rules, turned into blocks in the kernel) and the work-balanced
decode (fapool.sparse.triton_balanced_decode). Every decode row takes that path, whatever its
length: a row whose budget covers all its blocks attends over all of them (the dense result up
to the order of the floating-point sums, not bit for bit as on the CPU, where such rows go to the
dense backend). Prefill chunks go to the dense backend as on the CPU. The counters
sparse_tokens / sparse_dense_tokens are CPU-only (they would need a sync); sparse_calls counts
the host-side launches of the Triton path (a graph capture counts once).

A SparseGate, shared by a model's layers, turns the sparse path on per step: only once the
step's longest KV (AttentionMetadata.max_kv_len, a host value) reaches `min_context`. Below
that, selection (a score pass and two more launches a layer) costs more than the KV it skips
(engine TPOT, sparse vs dense: benchmarks/RESULTS.md, sparse_gpu). The summaries are still
written, so they are complete when the gate opens. SGLang's double-sparsity decode has the same
kind of threshold (default 4096). CUDA graphs capture each choice separately (DecodeGraphs pins
it per key).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fapool.attention.backend import AttentionBackend, empty_partial
from fapool.attention.metadata import AttentionMetadata
from fapool.config import DEFAULT_SPARSE_MIN_CONTEXT
from fapool.sparse.selection import (
    DEFAULT_MIN_BLOCKS,
    BudgetRule,
    budget_blocks_batched,
    max_budget_blocks,
    pages_in_range,
    select_block_indices,
)


@dataclass
class SparseGate:
    """Whether a step attends sparsely: when its longest KV reaches `min_context` (0: always).
    `pinned` overrides that while a CUDA graph is captured for one choice."""

    min_context: int = 0
    pinned: bool | None = None

    def __post_init__(self) -> None:
        if self.min_context < 0:
            raise ValueError(f"sparse min_context must be >= 0, got {self.min_context}")

    def active(self, max_kv_len: int) -> bool:
        return self.pinned if self.pinned is not None else max_kv_len >= self.min_context


def _refuse_scales(scales) -> None:
    # Block selection and the balanced kernel read a full-precision cache (EngineConfig refuses
    # sparse decode with an FP8 KV cache; this guards direct use).
    if scales is not None:
        raise ValueError("sparse decode does not read an FP8 KV cache")


class SparseAttentionBackend(AttentionBackend):
    name = "sparse"

    def __init__(
        self,
        dense: AttentionBackend,
        kv_budget: list[float] | BudgetRule | None,
        min_blocks: int = DEFAULT_MIN_BLOCKS,
        gate: SparseGate | None = None,
    ) -> None:
        self.dense = dense
        self.gate = gate if gate is not None else SparseGate()  # default: every step
        # Per KV head: a fraction of the blocks, or a rule in the block count (profiles
        # calibrated at several lengths); None wraps the dense backend without sparsity.
        self.budget: BudgetRule | None = None
        if kv_budget is not None:
            self.budget = kv_budget if isinstance(kv_budget, BudgetRule) else BudgetRule.fractions(kv_budget)
        self.min_blocks = min_blocks
        self.kmin: torch.Tensor | None = None  # [num_blocks, Hkv, D]
        self.kmax: torch.Tensor | None = None
        # Counters for benchmarks: KV entries attended by sparse decode vs what dense would read.
        self.sparse_tokens = 0
        self.sparse_dense_tokens = 0
        self.sparse_calls = 0  # Triton path: host-side launches of selection + sparse decode
        self._budget_dev: BudgetRule | None = None
        self._max_pages: dict[int, int] = {}

    # Summaries take 2 x Hkv x D per block and layer: the size of one token's K and V. The
    # runner counts it in the KV budget (ModelRunner.bytes_per_block).
    summary_tokens_per_block = 1

    @property
    def triton(self) -> bool:
        """Whether the Triton path runs (a Triton dense backend, so the tensors are on CUDA)."""
        return getattr(self.dense, "name", "") == "triton"

    @property
    def graph_safe(self) -> bool:
        return bool(getattr(self.dense, "graph_safe", False)) and self.triton

    # The decode split count and kernel of the dense backend, pinned by CUDA graph capture
    # (fapool.worker.cuda_graphs.pinned_splits); every layer's wrapper shares one dense backend.
    @property
    def num_splits(self) -> int | None:
        return getattr(self.dense, "num_splits", None)

    @num_splits.setter
    def num_splits(self, value: int | None) -> None:
        self.dense.num_splits = value

    @property
    def warp_split(self) -> bool | None:
        return getattr(self.dense, "warp_split", None)

    @warp_split.setter
    def warp_split(self, value: bool | None) -> None:
        self.dense.warp_split = value

    # --- KV write and block summaries ------------------------------------------------

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping, scales=None) -> None:
        _refuse_scales(scales)
        if self.budget is not None and self.triton:  # one launch: the KV write and the summaries
            from fapool.sparse.triton_summaries import write_kv_and_summaries

            self._ensure_summaries(k_cache)
            write_kv_and_summaries(k_cache, v_cache, key, value, slot_mapping, self.kmin, self.kmax)
            return
        self.dense.write_kv(k_cache, v_cache, key, value, slot_mapping)
        if self.budget is not None:
            self.update_summaries(k_cache, slot_mapping)

    def _ensure_summaries(self, k_cache: torch.Tensor) -> None:
        """(Re)allocate kmin/kmax for this cache: [num_blocks, Hkv, D] in its dtype."""
        num_blocks, _, num_kv_heads, head_dim = k_cache.shape
        if self.kmin is None or self.kmin.shape[0] != num_blocks or self.kmin.device != k_cache.device:
            shape = (num_blocks, num_kv_heads, head_dim)
            self.kmin = torch.zeros(shape, dtype=k_cache.dtype, device=k_cache.device)
            self.kmax = torch.zeros(shape, dtype=k_cache.dtype, device=k_cache.device)

    @torch.no_grad()
    def copy_block_state(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write of blocks src -> dst (ModelRunner.copy_blocks): their summaries follow
        the KV, since the Triton write extends a block's summary rather than recomputing it."""
        if self.kmin is not None:
            self.kmin[dst] = self.kmin[src]
            self.kmax[dst] = self.kmax[src]

    @torch.no_grad()
    def update_summaries(self, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Recompute kmin/kmax of the blocks `slot_mapping` touched, over offsets 0..last written."""
        block_size = k_cache.shape[1]
        self._ensure_summaries(k_cache)
        slots = slot_mapping[slot_mapping >= 0]
        if slots.numel() == 0:
            return
        blocks, inverse = torch.unique(slots // block_size, return_inverse=True)
        last = torch.zeros_like(blocks).scatter_reduce_(
            0, inverse, slots % block_size, "amax", include_self=False
        )
        keys = k_cache[blocks]  # [u, block_size, Hkv, D]
        stale = (torch.arange(block_size, device=keys.device)[None] > last[:, None])[..., None, None]
        self.kmin[blocks] = keys.masked_fill(stale, float("inf")).amin(dim=1)
        self.kmax[blocks] = keys.masked_fill(stale, float("-inf")).amax(dim=1)

    # --- attention ---------------------------------------------------------------------

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, scales=None, new_kv=None
    ):
        _refuse_scales(scales)
        if self.budget is None or self.kmin is None or not self.gate.active(meta.max_kv_len):
            return self.dense.forward(query, k_cache, v_cache, meta, scale, new_kv=new_kv)
        if self.triton:
            return self._forward_triton(query, k_cache, v_cache, meta, scale, new_kv)
        block_size = k_cache.shape[1]
        q_pos = meta.query_pos_start.tolist()
        kv_start = meta.kv_start.tolist()
        starts = meta.query_start_loc.tolist()
        rows, visible = [], []
        for s, (n_q, kv_len) in enumerate(zip(meta.query_lens_cpu, meta.kv_lens_cpu)):
            seen = min(kv_len, q_pos[s] - kv_start[s] + 1)  # the KV this one query sees
            if n_q == 1 and seen > 0:
                rows.append(s)
                visible.append(seen)
        # Budgets of all decode rows at once; a row goes sparse if some head skips a block.
        k_all = budget_blocks_batched(
            self.budget, torch.tensor(visible, dtype=torch.long), block_size, self.min_blocks
        )
        num_blocks = [-(-v // block_size) for v in visible]
        sparse = [i for i, nb in enumerate(num_blocks) if int(k_all[i].min()) < nb] if rows else []
        seqs = [rows[i] for i in sparse]
        n_kv = [visible[i] for i in sparse]
        budgets = list(k_all[sparse]) if sparse else []
        if not seqs:
            return self.dense.forward(query, k_cache, v_cache, meta, scale)

        if len(seqs) < meta.num_seqs:  # the others densely; the sparse rows see no KV there
            out, lse = self.dense.forward(query, k_cache, v_cache, meta.without_kv(seqs), scale)
        else:
            out, lse = empty_partial(query)
        device = query.device
        tok = torch.tensor([starts[s] for s in seqs], device=device)
        o, l = self.sparse_decode(
            query[tok],
            k_cache,
            v_cache,
            meta.block_tables[torch.tensor(seqs, device=device)],
            torch.tensor(n_kv, device=device),
            torch.stack(budgets).to(device),
            scale,
        )
        out[tok] = o.to(out.dtype)
        lse[tok] = l
        return out, lse

    def _forward_triton(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, new_kv=None):
        """Decode rows: Triton selection + balanced sparse decode; other rows: the dense backend.
        Reads no device value on the host (graph-safe for a decode-only batch)."""
        if meta.is_decode_only:  # one query per row: the rows are the sequences
            return self._sparse_rows(
                query,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.kv_lens,
                meta.query_pos_start,
                meta.kv_start,
                scale,
            )
        decode = [s for s, n in enumerate(meta.query_lens_cpu) if n == 1]
        if not decode:
            return self.dense.forward(query, k_cache, v_cache, meta, scale, new_kv=new_kv)
        # Mixed batch (eager): the dense backend sees the decode rows without KV (they come out
        # as 0 / -inf), then the sparse results overwrite them.
        device = query.device
        out, lse = self.dense.forward(query, k_cache, v_cache, meta.without_kv(decode), scale)
        starts = list(itertools.accumulate(meta.query_lens_cpu, initial=0))
        seqs = torch.tensor(decode).to(device, non_blocking=True)
        tok = torch.tensor([starts[s] for s in decode]).to(device, non_blocking=True)
        o, l = self._sparse_rows(
            query[tok],
            k_cache,
            v_cache,
            meta.block_tables[seqs],
            meta.kv_lens[seqs],
            meta.query_pos_start[seqs],
            meta.kv_start[seqs],
            scale,
        )
        out[tok] = o
        lse[tok] = l
        return out, lse

    def _sparse_rows(self, q, k_cache, v_cache, tables, kv_lens, q_pos, kv_start, scale):
        """q [B, Hq, D], one query per row -> (out, lse) over each KV head's selected blocks."""
        from fapool.sparse.triton_balanced_decode import balanced_sparse_decode
        from fapool.sparse.triton_select import select_blocks_triton

        if self._budget_dev is None or self._budget_dev.device != q.device:
            self._budget_dev = self.budget.to(q.device)
        # The largest selection any row can get: budget_blocks is monotone in the block count,
        # so it is the budget of a row as wide as the table (exact cap, no row loses a block).
        width = tables.shape[1]
        if width not in self._max_pages:  # host-side, once per table width
            self._max_pages[width] = max(1, max_budget_blocks(self.budget, width, self.min_blocks))
        max_pages = self._max_pages[width]
        self.sparse_calls += 1
        pages, lens = select_blocks_triton(
            q,
            self.kmin,
            self.kmax,
            tables,
            kv_lens,
            self._budget_dev,
            k_cache.shape[1],
            max_pages=max_pages,
            min_blocks=self.min_blocks,
            query_pos_start=q_pos,
            kv_start=kv_start,
        )
        return balanced_sparse_decode(q, k_cache, v_cache, pages, lens, scale)

    @torch.no_grad()
    def sparse_decode(
        self,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, H, D]
        v_cache: torch.Tensor,
        tables: torch.Tensor,  # [B, max_blocks] int32
        n_kv: torch.Tensor,  # [B] visible KV entries
        budgets: torch.Tensor,  # [B, H] blocks per KV head
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of one query per sequence over its selected blocks -> out [B, Hq, D] f32,
        lse [B, Hq] f32."""
        block_size = k_cache.shape[1]
        num_blocks = (n_kv + block_size - 1) // block_size  # [B]
        n_max = int(num_blocks.max())
        table = tables[:, :n_max]
        score = decode_block_scores(q, self.kmin, self.kmax, table)
        width = int(budgets.max())
        blocks = select_block_indices(score, num_blocks, budgets, width)
        pages, lens = pages_in_range(
            blocks, n_kv, table, torch.zeros_like(num_blocks), num_blocks, block_size, width
        )
        out, lse = attend_selected(q, k_cache, v_cache, pages, lens, scale)
        self.sparse_tokens += int(lens.sum()) * (q.shape[1] // k_cache.shape[2])
        self.sparse_dense_tokens += int(n_kv.sum()) * q.shape[1]
        return out, lse


def decode_block_scores(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, D] one query per row, kmin/kmax [num_blocks, Hkv, D], table [B, N] -> [B, Hkv, N]:
    per block the upper bound of q . k from the key min/max, max over each KV head's query heads.
    The torch sparse decode's score (the Triton selection computes the same bound)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kmin.shape[1]
    qg = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    table = table.long()
    lo = kmin[table].float().permute(0, 2, 1, 3)  # [B, H, N, D]
    hi = kmax[table].float().permute(0, 2, 1, 3)
    bound = torch.einsum("bhgd,bhnd->bhgn", qg.clamp(min=0), hi) + torch.einsum(
        "bhgd,bhnd->bhgn", qg.clamp(max=0), lo
    )
    return bound.amax(dim=2)


def attend_selected(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] one query per row over each KV head's own pages [B, Hkv, K] holding lens
    [B, Hkv] visible entries (pages_in_range's layout) -> out [B, Hq, D] f32, lse [B, Hq] f32;
    a head with no entries gets 0 and -inf. Torch; the Triton kernel is balanced_sparse_decode."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    num_seqs, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    heads = torch.arange(num_kv_heads, device=q.device).view(1, -1, 1)
    pages = pages.long()
    k = k_cache.permute(0, 2, 1, 3)[pages, heads].float().flatten(2, 3)  # [B, H, K * bs, D]
    v = v_cache.permute(0, 2, 1, 3)[pages, heads].float().flatten(2, 3)
    valid = torch.arange(k.shape[2], device=q.device) < lens[..., None]  # [B, H, K * bs]
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, G]
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgl,bhld->bhgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim), lse.reshape(num_seqs, num_heads)


def enable_sparse_attention(
    model: torch.nn.Module,
    dense: AttentionBackend,
    profile,
    min_context: int = DEFAULT_SPARSE_MIN_CONTEXT,
) -> AttentionBackend:
    """Give every attention layer of `model` its own SparseAttentionBackend with the profile's
    budgets (a SparseProfile or a path to its JSON), sparse in steps whose longest KV reaches
    `min_context`. Returns the backend for the engine: the dense one wrapped without budgets,
    holding the layers' shared gate (on CUDA with Triton, graph-safe: the runner captures
    decode steps, one graph per gate choice; elsewhere the torch path reads lengths on the host)."""
    from fapool.sparse.profile import SparseProfile

    if isinstance(profile, str):
        profile = SparseProfile.load(profile)
    layers = model.model.layers
    if len(layers) != profile.num_layers or layers[0].self_attn.num_kv_heads != profile.num_kv_heads:
        raise ValueError(
            f"sparse profile is for {profile.num_layers} layers x {profile.num_kv_heads} KV heads, "
            f"the model has {len(layers)} x {layers[0].self_attn.num_kv_heads}"
        )
    gate = SparseGate(min_context)
    for i, layer in enumerate(layers):
        layer.self_attn.backend = SparseAttentionBackend(dense, profile.rule(i), profile.min_blocks, gate)
    return SparseAttentionBackend(dense, None, gate=gate)
