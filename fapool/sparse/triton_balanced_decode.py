"""Work-balanced sparse paged decode: the split of the KV follows each pair's selected length.

    balanced_sparse_decode(q, k_cache, v_cache, pages, lens, scale) -> (out, lse)

Inputs: compacted per-(sequence, KV head) tables from fapool.sparse.triton_select. Why balanced:
one split count for every (sequence, KV head) pair, chosen from the longest selection, would
let the pairs with big budgets form a long tail while the programs of short pairs idle
(head-adaptive budgets differ widely between the heads of one layer). Here the work is cut in
chunks of equal size, so a pair of 10x the blocks gets 10x the programs:

    tiles_r  = ceil(lens_r / BLOCK_N)                     KV tiles of pair r
    chunk    = smallest C with  sum_r ceil(tiles_r / C) <= G     (bisection, a few steps)
    splits_r = ceil(tiles_r / chunk),  first_r = exclusive prefix sum of splits_r

G, the grid, is fixed on the host from shapes only (one full wave of resident programs, more
whole waves once the pairs exceed half a wave: default_num_programs), so no shape depends on
the data and the call can sit in a CUDA graph.
Every program loads the pairs' lengths (one coalesced read of B x Hkv ints), computes the same
plan in registers, finds its (pair, split) and exits if it has none; no host sync, no extra
launch for the prefix sum. A pair with one split writes the result directly; the others write
(out, lse) partials that the second kernel merges with LSE weights, BLOCK_S splits at a time, so
a pair may have any number of them. Program r < B x Hkv also stores pair r's (first item,
splits) for the merge (the grid covers every pair, empty ones included).

Reference: SparseAttentionBackend.sparse_decode (fapool/attention/sparse.py); tests:
tests/sparse/test_triton_select.py; benchmark: benchmarks/sparse_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fapool.attention.triton_decode import (
    DEFAULT_BLOCK_N,
    DEFAULT_NUM_STAGES,
    DEFAULT_NUM_WARPS,
    LN2,
    LOG2E,
    _num_sms,
    _tile_pages,
    resident_programs_per_sm,
)

REDUCE_BLOCK_S = 16  # partials merged per step of the reduce loop


@triton.jit
def _attend_pair_tiles(
    Q, K, V, tables, row, seq, kvh, n_kv, tile_lo, tile_hi, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax of one (sequence, KV head)'s GROUP query heads over KV tiles
    [tile_lo, tile_hi) of its compacted table `row` (n_kv visible entries), K/V pages prefetched
    one tile ahead. Returns the normalised partial out [BLOCK_H, BLOCK_D] (float32), its LSE in
    log2 units (-inf where no key was seen), and the heads / masks to store them with."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = tables + row * stride_bt
    v_base = V + kvh * stride_vh + offs_d[None, :]
    k_base = K + kvh * stride_kh + offs_d[None, :]
    page_next = _tile_pages(table, tile_lo, offs_n, n_kv, PAGE, BLOCK_N)
    for t in range(tile_lo, tile_hi):
        page = page_next
        page_next = _tile_pages(table, t + 1, offs_n, n_kv, PAGE, BLOCK_N)
        pos = t * BLOCK_N + offs_n
        n_mask = pos < n_kv
        k_rows = page * stride_kb + (pos % PAGE) * stride_kt
        v_rows = page * stride_vb + (pos % PAGE) * stride_vt
        kv_mask = n_mask[:, None] if BLOCK_D == HEAD_DIM else n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + k_rows[:, None], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    return o, lse2, heads, h_mask, d_mask


@triton.jit
def _plan(LENS, num_pairs, num_programs, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split plan every program recomputes: (lens, splits, inclusive prefix sum of splits,
    chunk) over the pairs 0..BLOCK_R-1 (zero past num_pairs).

    chunk = the smallest C with items(C) = sum_r ceil(tiles_r / C) <= G, by bisection between
    bounds that are usually a few apart: items(C) >= T / C, so C >= ceil(T / G); and
    items(C) <= T / C + R' (R' non-empty pairs), so ceil(T / (G - R')) fits, as does the
    largest tiles_r (one split per non-empty pair, R' <= G items)."""
    r = tl.arange(0, BLOCK_R)
    n = tl.maximum(tl.load(LENS + r, mask=r < num_pairs, other=0), 0)
    tiles = (n + BLOCK_N - 1) // BLOCK_N
    total = tl.sum(tiles, 0)
    busy = tl.sum((tiles > 0).to(tl.int32), 0)
    longest = tl.maximum(tl.max(tiles, 0), 1)
    lo = tl.maximum((total + num_programs - 1) // num_programs, 1)
    spare = num_programs - busy
    hi = tl.where(spare > 0, (total + spare - 1) // tl.maximum(spare, 1), longest)
    hi = tl.maximum(tl.minimum(hi, longest), lo)
    while lo < hi:  # invariant: hi fits in G items, lo - 1 does not
        mid = (lo + hi) // 2
        fits = tl.sum((tiles + mid - 1) // mid, 0) <= num_programs
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid + 1)
    splits = (tiles + hi - 1) // hi
    return n, splits, tl.cumsum(splits, 0), hi


@triton.jit
def _balanced_split_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    PLAN,
    tables,
    lens,
    qk_scale,
    num_pairs,
    num_programs,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_lt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    item = tl.program_id(0)
    n_all, splits, incl, chunk = _plan(lens, num_pairs, num_programs, BLOCK_R, BLOCK_N)
    pair_ids = tl.arange(0, BLOCK_R)
    if item < num_pairs:  # the grid covers every pair: hand pair `item`'s splits to the reduce
        this = pair_ids == item
        tl.store(PLAN + 2 * item, tl.sum(tl.where(this, incl - splits, 0), 0))
        tl.store(PLAN + 2 * item + 1, tl.sum(tl.where(this, splits, 0), 0))
    if item >= tl.sum(splits, 0):
        return  # more programs than work items (the grid is the fixed upper bound)
    row = tl.sum((incl <= item).to(tl.int32), 0)  # the pair whose items cover `item`
    this = pair_ids == row
    n_kv = tl.sum(tl.where(this, n_all, 0), 0)
    num_splits = tl.sum(tl.where(this, splits, 0), 0)
    split = item - tl.sum(tl.where(this, incl - splits, 0), 0)
    num_tiles = tl.cdiv(n_kv, BLOCK_N)
    tile_lo = split * chunk
    tile_hi = tl.minimum(tile_lo + chunk, num_tiles)
    seq = row // NUM_KV_HEADS
    kvh = row % NUM_KV_HEADS

    o, lse2, heads, h_mask, d_mask = _attend_pair_tiles(  # lse2 in log2 units
        Q, K, V, tables, row, seq, kvh, n_kv, tile_lo, tile_hi, qk_scale,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP, BLOCK_H, HEAD_DIM, BLOCK_D, PAGE, BLOCK_N,
    )
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hd_mask = h_mask[:, None] & d_mask[None, :]
    if num_splits == 1:
        tl.store(
            OUT + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(OUT.dtype.element_ty),
            mask=hd_mask,
        )
        tl.store(LSE + seq * stride_lt + heads, lse2 * LN2, mask=h_mask)
    else:  # partials: MID_O [G, GROUP, BLOCK_D], MID_LSE [G, GROUP], contiguous
        mid = item * GROUP + offs_h
        tl.store(MID_O + mid[:, None] * BLOCK_D + offs_d[None, :], o, mask=hd_mask)
        tl.store(MID_LSE + mid, lse2, mask=h_mask)


@triton.jit
def _balanced_reduce_kernel(
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    PLAN,
    stride_ot,
    stride_oh,
    stride_lt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # pair (sequence, KV head)
    g = tl.program_id(1)  # query head within the group
    num_splits = tl.load(PLAN + 2 * row + 1)
    if num_splits == 1:
        return  # written by its only split
    first = tl.load(PLAN + 2 * row)
    seq = row // NUM_KV_HEADS
    head = (row % NUM_KV_HEADS) * GROUP + g
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m = tl.full([], -1.0e30, dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):  # online merge, BLOCK_S partials at a time
        s_mask = s0 + offs_s < num_splits
        mid = (first + s0 + offs_s) * GROUP + g
        lse2 = tl.load(MID_LSE + mid, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse2, 0))
        w = tl.exp2(lse2 - m_new)  # 0 for masked slots
        o = tl.load(
            MID_O + mid[:, None] * BLOCK_D + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    seen = total > 0.0  # an empty pair (no splits) writes 0 and lse -inf
    total_safe = tl.where(seen, total, 1.0)
    tl.store(
        OUT + seq * stride_ot + head * stride_oh + offs_d,
        (acc / total_safe).to(OUT.dtype.element_ty),
        mask=d_mask,
    )
    tl.store(LSE + seq * stride_lt + head, tl.where(seen, (m + tl.log2(total_safe)) * LN2, float("-inf")))


def default_num_programs(
    head_dim: int, elem_size: int, device: torch.device, block_n: int = DEFAULT_BLOCK_N, num_pairs: int = 1
) -> int:
    """Whole waves of split programs (a wave: what the SMs hold at once, the dense kernel's
    model), enough that at least half the grid is spare beyond one split per pair: with fewer,
    most pairs get one split and the longest ones set the time again. One wave up to
    num_pairs = wave / 2 (batch 32 with 8 KV heads on an H200)."""
    per_sm = resident_programs_per_sm(
        block_n, triton.next_power_of_2(head_dim), DEFAULT_NUM_STAGES, DEFAULT_NUM_WARPS, elem_size
    )
    wave = per_sm * _num_sms(device)
    return wave * max(1, triton.cdiv(2 * num_pairs, wave))


def balanced_sparse_decode(
    q: torch.Tensor,  # [B, Hq, D] one decode query per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    pages: torch.Tensor,  # [B, Hkv, P] int32 compacted tables
    lens: torch.Tensor,  # [B, Hkv] int32 visible entries of each table
    scale: float,
    num_programs: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, Hq, D] in q's dtype, lse [B, Hq] float32, natural log). A pair with lens 0
    gets out 0 and lse -inf. num_programs: the split grid (default: default_num_programs)."""
    num_seqs, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if (
        pages.dim() != 3
        or pages.shape[:2] != (num_seqs, num_kv_heads)
        or lens.shape != (num_seqs, num_kv_heads)
    ):
        raise ValueError(
            f"pages {tuple(pages.shape)} / lens {tuple(lens.shape)} must start with ({num_seqs}, {num_kv_heads})"
        )
    if pages.dtype != torch.int32 or lens.dtype != torch.int32:
        raise ValueError(f"pages and lens must be int32, got {pages.dtype}, {lens.dtype}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and caches need a contiguous head dimension")
    if head_dim < 16:
        raise ValueError(f"head_dim must be >= 16 for tl.dot, got {head_dim}")
    out = torch.empty_like(q)
    lse = torch.empty((num_seqs, num_heads), dtype=torch.float32, device=q.device)
    num_pairs = num_seqs * num_kv_heads
    if num_pairs == 0:
        return out, lse
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    tables = pages.reshape(num_pairs, -1)
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    lens = lens.reshape(-1).contiguous()
    if num_programs is None:
        num_programs = default_num_programs(head_dim, q.element_size(), q.device, block_n, num_pairs)
    grid = max(num_programs, num_pairs)  # >= pairs: one split each always fits
    consts = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d)
    mid_o = torch.empty((grid, group, block_d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((grid, group), dtype=torch.float32, device=q.device)
    plan = torch.empty((num_pairs, 2), dtype=torch.int32, device=q.device)  # (first item, splits)
    _balanced_split_kernel[(grid,)](
        q,
        k_cache,
        v_cache,
        out,
        lse,
        mid_o,
        mid_lse,
        plan,
        tables,
        lens,
        scale * LOG2E,
        num_pairs,
        grid,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        PAGE=page,
        BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(num_pairs)),
        num_warps=num_warps,
        num_stages=num_stages,
        **consts,
    )
    _balanced_reduce_kernel[(num_pairs, group)](
        out,
        lse,
        mid_o,
        mid_lse,
        plan,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        BLOCK_S=REDUCE_BLOCK_S,
        num_warps=1,
        **consts,
    )
    return out, lse
