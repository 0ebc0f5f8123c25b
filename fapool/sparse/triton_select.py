"""Block selection for sparse decode in two Triton launches, with no host sync.

    select_blocks_triton(q, kmin, kmax, block_tables, n_kv, budgets, block_size)
        -> pages [B, Hkv, max_pages] int32, lens [B, Hkv] int32

the compacted per-(sequence, KV head) tables and lengths that balanced_sparse_decode reads.
Every shape depends only on the input shapes (max_pages defaults to the block-table width),
so selection + decode can be captured in a CUDA graph with the rest of a decode step.

Stage 1 (_block_score_kernel, grid B x Hkv x tiles of 64 blocks): score[b, h, n] = max over
the KV head's query heads of  q+ . kmax[n] + q- . kmin[n]  (the Quest upper bound of q . k, as
in fapool.sparse.selection). It reads kmin/kmax once: 2 x N x D elements per (sequence,
head), 1/16 of what dense decode reads at block size 16. Scores go to a float32 scratch row.

Stage 2 (_select_compact_kernel, grid B x Hkv, the whole row in registers): the budget k
(given, or a fraction / BudgetRule of nb, rounded and clamped as budget_blocks does), then block_order's rule without a
sort: the sink and the most recent block, plus the m = k - 2 best others. The m-th largest
score is found over its order-preserving int32 key as the largest t with count(key >= t) >= m:
for rows up to SORT_MAX_ROW blocks (8K tokens at block 16) by one bitonic sort of the keys
(tl.sort; t is the m-th of them), longer rows by a radix search, the sign first, then one bit a
pass (31 block-wide reductions). Blocks above t are taken and ties at t in ascending block
index (an inclusive cumsum ranks them). A second cumsum gives each chosen block its slot, so
pages come out in ascending block order, zero-padded, and lens counts the chosen entries (only
the most recent block is partial, and it is the last entry).

Reference: fapool.sparse.selection.compact_selection over block_bounds scores; tests:
tests/sparse/test_triton_select.py; benchmark: benchmarks/sparse_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fapool.sparse.selection import DEFAULT_MIN_BLOCKS, BudgetRule

SCORE_TILE = 64  # blocks per stage-1 program: 2 x 64 x D summaries (32 KB at D 128, bf16)
SCORE_WARPS = 4
# Padded row length up to which stage 2 finds the threshold with one bitonic sort (tl.sort) of the
# keys instead of 31 one-bit counting passes, each a block-wide reduction with its barriers: the
# same threshold (the m-th largest key), so the same blocks. The sort is faster on short rows, the
# passes on long ones (benchmarks/RESULTS.md: sparse_gpu, sparse_score_sweep). Scores and stage 2
# stay two launches: fusing them loses the score pass's tile parallelism, worth more than a launch.
SORT_MAX_ROW = 512


@triton.jit
def _visible(N_KV, QPOS, KV0, seq, CLIP: tl.constexpr):
    """Visible KV entries of a row: n_kv, or with CLIP the causal bound of an attention shard
    (AttentionMetadata: entry i is seen iff kv_start + i <= query_pos), never below 0."""
    n = tl.load(N_KV + seq)
    if CLIP:
        n = tl.minimum(n, tl.load(QPOS + seq) - tl.load(KV0 + seq) + 1)
    return tl.maximum(n, 0)


@triton.jit
def _block_score_kernel(
    Q,
    KMIN,
    KMAX,
    TABLES,
    N_KV,
    QPOS,
    KV0,
    SCORE,
    stride_qt,
    stride_qh,
    stride_sb,
    stride_sh,
    stride_bt,
    stride_ob,
    stride_oh,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    nb = (_visible(N_KV, QPOS, KV0, seq, CLIP) + PAGE - 1) // PAGE
    if tile * TILE >= nb:
        return  # past this sequence's blocks (the grid covers the table width)
    offs_n = tile * TILE + tl.arange(0, TILE)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < nb
    q = tl.load(
        Q + seq * stride_qt + (kvh * GROUP + offs_h)[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    page = tl.load(TABLES + seq * stride_bt + offs_n, mask=n_mask, other=0).to(tl.int64)
    rows = page[:, None] * stride_sb + kvh * stride_sh + offs_d[None, :]
    lo = tl.load(KMIN + rows, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    hi = tl.load(KMAX + rows, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    # max(q*lo, q*hi) summed over d == q+ . hi + q- . lo (lo <= hi). Triton promotes bf16
    # max/min to fp32: cast back so both dot operands share the dtype (exact: a sign split).
    q_pos = tl.maximum(q, 0.0).to(hi.dtype)
    q_neg = tl.minimum(q, 0.0).to(lo.dtype)
    s = tl.dot(q_pos, tl.trans(hi), input_precision=DOT_PRECISION)
    s += tl.dot(q_neg, tl.trans(lo), input_precision=DOT_PRECISION)  # [BLOCK_H, TILE] f32
    s = tl.where(h_mask[:, None], s, float("-inf"))
    tl.store(SCORE + seq * stride_ob + kvh * stride_oh + offs_n, tl.max(s, 0), mask=n_mask)


@triton.jit
def _select_compact_kernel(
    SCORE,
    TABLES,
    N_KV,
    QPOS,
    KV0,
    BUDGET,
    KNOT_NB,
    KNOT_K,
    SLOPE,
    PAGES,
    LENS,
    max_pages,
    min_blocks,
    stride_kh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_gb,
    stride_gh,
    stride_pb,
    stride_ph,
    stride_lb,
    PAGE: tl.constexpr,
    NPAD: tl.constexpr,
    FROM_FRAC: tl.constexpr,
    NKNOT: tl.constexpr,
    CLIP: tl.constexpr,
    SORT: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    n_kv = _visible(N_KV, QPOS, KV0, seq, CLIP)
    nb = (n_kv + PAGE - 1) // PAGE
    if FROM_FRAC:  # budget_blocks: BudgetRule.raw in float64, ceil(raw - 1e-6), clamped
        frac = tl.load(BUDGET + kvh * stride_gh)
        nbf = nb.to(tl.float64)
        raw = frac * nbf
        for j in tl.static_range(NKNOT):  # the piecewise-linear knots, in BudgetRule.raw's order
            x = tl.load(KNOT_NB + j)
            y = tl.load(KNOT_K + kvh * stride_kh + j)
            sl = tl.load(SLOPE + kvh * stride_kh + j)
            raw = tl.where(nbf > x, y + (nbf - x) * sl, raw)
        eps = tl.full([], 1e-6, tl.float64)  # a bare 1e-6 would be a float32 constant
        k = tl.math.ceil(raw - eps).to(tl.int32)
        k = tl.maximum(k, tl.minimum(min_blocks, nb))
    else:
        k = tl.load(BUDGET + seq * stride_gb + kvh * stride_gh).to(tl.int32)
    k = tl.maximum(tl.minimum(tl.minimum(k, nb), max_pages), 0)

    idx = tl.arange(0, NPAD)
    vis = idx < nb
    first = idx == 0
    last = idx == nb - 1
    fixed = vis & (first | last)
    keep_fixed = vis & ((first & (k >= 1)) | (last & (k >= 2)))
    cand = vis & (first == 0) & (last == 0)
    m = tl.maximum(k - tl.sum(fixed.to(tl.int32), 0), 0)  # blocks to pick by score

    score = tl.load(SCORE + seq * stride_ob + kvh * stride_oh + idx, mask=vis, other=0.0)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in a sort
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order == float order
    key = tl.where(cand, key, -2147483648)

    # thr = the m-th largest key among the candidates: by a sort, or by the radix search (sign
    # first, then bits 30..0 greedily, one a pass). With SORT the sign count below is dead code,
    # which the compiler drops.
    n_nonneg = tl.sum((cand & (key >= 0)).to(tl.int32), 0)
    thr = tl.where(n_nonneg >= m, 0, -2147483648)
    if SORT:  # the m-th entry of the keys sorted descending (m = 0: above every key, as below)
        ranked = tl.sort(key, 0, descending=True)
        kth = tl.max(tl.where(idx == m - 1, ranked, -2147483648), 0)
        thr = tl.where(m > 0, kth, 2147483647)
    else:  # a long row: one bit a pass
        for i in range(31):
            trial = thr + (1 << (30 - i))
            count = tl.sum((cand & (key >= trial)).to(tl.int32), 0)
            thr = tl.where(count >= m, trial, thr)
    above = cand & (key > thr)
    tied = cand & (key == thr)
    rank = tl.cumsum(tied.to(tl.int32), 0)  # ties: lower block index first
    chosen = keep_fixed | above | (tied & (rank <= m - tl.sum(above.to(tl.int32), 0)))

    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    page = tl.load(TABLES + seq * stride_bt + idx, mask=vis, other=0)
    out = PAGES + seq * stride_pb + kvh * stride_ph
    tl.store(out + slot, page, mask=chosen)
    num_chosen = tl.sum(chosen.to(tl.int32), 0)
    # Zero the unused tail (max_pages <= W <= NPAD: one pass), so the output is deterministic.
    tl.store(out + idx, tl.zeros([NPAD], dtype=tl.int32), mask=(idx >= num_chosen) & (idx < max_pages))
    has_last = tl.sum((chosen & last).to(tl.int32), 0)
    length = (num_chosen - has_last) * PAGE + has_last * (n_kv - (nb - 1) * PAGE)
    tl.store(LENS + seq * stride_lb + kvh, length)


@torch.no_grad()
def block_scores_triton(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    block_tables: torch.Tensor,
    n_kv: torch.Tensor,
    block_size: int,
    query_pos_start: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1 alone: score [B, Hkv, W] float32, the bound of each visible block (entries at
    or past a row's block count are left unwritten). Inputs as select_blocks_triton, checked there."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kmin.shape[1]
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    n_kv = n_kv.to(torch.int32)
    clip = query_pos_start is not None
    score = torch.empty((num_seqs, num_kv_heads, width), dtype=torch.float32, device=q.device)
    _block_score_kernel[(num_seqs, num_kv_heads, triton.cdiv(width, SCORE_TILE))](
        q,
        kmin,
        kmax,
        block_tables,
        n_kv,
        query_pos_start if clip else n_kv,
        kv_start if clip else n_kv,
        score,
        q.stride(0),
        q.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        block_tables.stride(0),
        score.stride(0),
        score.stride(1),
        PAGE=block_size,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        TILE=SCORE_TILE,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        CLIP=clip,
        num_warps=SCORE_WARPS,
    )
    return score


@torch.no_grad()
def select_blocks_triton(
    q: torch.Tensor,  # [B, Hq, D]
    kmin: torch.Tensor,  # [num_blocks, Hkv, D]
    kmax: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    n_kv: torch.Tensor,  # [B] int32 visible KV entries (0: an empty row, e.g. graph padding)
    budgets: torch.Tensor | BudgetRule,  # [B, Hkv] int blocks, [Hkv] float64 fractions, or a rule
    block_size: int,
    max_pages: int | None = None,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    query_pos_start: torch.Tensor | None = None,  # [B] int32, with kv_start: clip n_kv causally
    kv_start: torch.Tensor | None = None,
    page_tables: torch.Tensor | None = None,  # [B, W] int32: what pages holds (default block_tables)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compacted tables pages [B, Hkv, max_pages] int32 and lengths lens [B, Hkv] int32.

    The summaries are read at block_tables' entries; pages holds the chosen blocks' entries
    of page_tables (a caller whose summary rows are not its KV pages, as the pool's driver).

    A row sees n_kv entries, or with query_pos_start and kv_start (an AttentionMetadata's, for
    its one-query rows) min(n_kv, query_pos_start - kv_start + 1), computed in the kernels.

    budgets: blocks per (sequence, KV head), or per-KV-head fractions (float64) or a
    BudgetRule (on q's device) turned into blocks in the kernel exactly as
    budget_blocks(rule, nb, min_blocks) does. A row takes
    min(k, nb, max_pages) blocks; max_pages (<= W, default W) is the table width the decode
    sees (the largest budget is enough).
    Preconditions not checked (they would need a sync): n_kv <= W * block_size."""
    if q.dim() != 3 or kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(
            f"expected q [B,Hq,D], kmin/kmax [blocks,Hkv,D]; got {tuple(q.shape)}, {tuple(kmin.shape)}"
        )
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kmin.shape[1]
    if kmin.shape[2] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"head mismatch: q {tuple(q.shape)}, summaries {tuple(kmin.shape)}")
    if q.dtype != kmin.dtype or kmin.dtype != kmax.dtype:
        raise ValueError(f"q and summaries must share a dtype, got {q.dtype}, {kmin.dtype}, {kmax.dtype}")
    if q.stride(2) != 1 or kmin.stride() != kmax.stride() or kmin.stride(2) != 1:
        raise ValueError("q and summaries need a contiguous head dimension and kmin/kmax equal strides")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be int32 [{num_seqs}, W], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if page_tables is None:
        page_tables = block_tables
    elif (page_tables.dtype, page_tables.shape, page_tables.stride()) != (
        torch.int32,
        block_tables.shape,
        block_tables.stride(),
    ):
        raise ValueError("page_tables must be int32 with block_tables' shape and strides")
    if n_kv.shape != (num_seqs,):
        raise ValueError(f"n_kv must be [{num_seqs}], got {tuple(n_kv.shape)}")
    if (query_pos_start is None) != (kv_start is None):
        raise ValueError("query_pos_start and kv_start come together")
    if query_pos_start is not None:
        for name, t in (("query_pos_start", query_pos_start), ("kv_start", kv_start)):
            if t.shape != (num_seqs,) or t.dtype != torch.int32 or (num_seqs and t.stride(0) != 1):
                raise ValueError(
                    f"{name} must be contiguous int32 [{num_seqs}], got {t.dtype} {tuple(t.shape)}"
                )
    rule = budgets if isinstance(budgets, BudgetRule) else None
    if rule is not None:
        if rule.device != q.device:  # a copy here would be a host-to-device copy in a graph capture
            raise ValueError(f"the budget rule is on {rule.device}, q on {q.device}: move it with rule.to()")
        budgets = rule.frac
    from_frac = budgets.is_floating_point()
    want = (num_kv_heads,) if from_frac else (num_seqs, num_kv_heads)
    if tuple(budgets.shape) != want:
        kind = "fractions" if from_frac else "blocks"
        raise ValueError(f"budgets must be {list(want)} ({kind}), got {tuple(budgets.shape)}")
    if head_dim < 16:
        raise ValueError(f"head_dim must be >= 16 for tl.dot, got {head_dim}")
    width = block_tables.shape[1]
    max_pages = width if max_pages is None else max_pages
    if not 1 <= max_pages <= width:
        raise ValueError(f"max_pages must lie in [1, {width}] (the block-table width), got {max_pages}")
    n_kv = n_kv.to(torch.int32)
    budgets = budgets.to(torch.float64 if from_frac else torch.int32)
    pages = torch.empty((num_seqs, num_kv_heads, max_pages), dtype=torch.int32, device=q.device)
    lens = torch.empty((num_seqs, num_kv_heads), dtype=torch.int32, device=q.device)
    if num_seqs == 0:
        return pages, lens
    score = block_scores_triton(q, kmin, kmax, block_tables, n_kv, block_size, query_pos_start, kv_start)
    clip = query_pos_start is not None
    npad = max(16, triton.next_power_of_2(width))
    stride_gb, stride_gh = (0, budgets.stride(0)) if from_frac else budgets.stride()
    num_knots = 0 if rule is None else rule.knot_nb.numel()
    if num_knots:
        knot_nb, knot_k, slope = rule.knot_nb, rule.knot_k, rule.slope
        if knot_k.shape != (num_kv_heads, num_knots) or slope.shape != knot_k.shape:
            raise ValueError(f"budget rule knots must be [{num_kv_heads}, {num_knots}]")
        if not all(t.dtype == torch.float64 and t.is_contiguous() for t in (knot_nb, knot_k, slope)):
            raise ValueError("budget rule tensors must be contiguous float64 (BudgetRule.from_knots makes them so)")
    else:
        knot_nb = knot_k = slope = budgets  # not read
    _select_compact_kernel[(num_seqs, num_kv_heads)](
        score,
        page_tables,
        n_kv,
        query_pos_start if clip else n_kv,
        kv_start if clip else n_kv,
        budgets,
        knot_nb,
        knot_k,
        slope,
        pages,
        lens,
        max_pages,
        min_blocks,
        knot_k.stride(0) if num_knots else 0,
        score.stride(0),
        score.stride(1),
        block_tables.stride(0),
        stride_gb,
        stride_gh,
        pages.stride(0),
        pages.stride(1),
        lens.stride(0),
        PAGE=block_size,
        NPAD=npad,
        FROM_FRAC=from_frac,
        NKNOT=num_knots,
        CLIP=clip,
        SORT=npad <= SORT_MAX_ROW,
        num_warps=min(16, max(4, npad // 512)),  # ~16 row entries a thread
        enable_fp_fusion=False,  # frac * nb - 1e-6 rounded twice, as torch does
    )
    return pages, lens
