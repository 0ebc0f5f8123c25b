"""Sparse paged decode in Triton: each (sequence, KV head) attends over its own selected blocks.

Selection: fapool.sparse.triton_select (two Triton launches, no host sync; torch reference
fapool.sparse.selection.select_blocks_torch). The kernel here is the
dense split-KV decode kernel (fapool.attention.triton_decode) with one change: its block table
and length are per (sequence, KV head) rather than per sequence. A selection is a compacted
table whose last entry is the most recent block (the only partial one), so the visible entries
are exactly the first  (k - 1) * block_size + tail  of the compacted sequence; no causal mask
beyond that length is needed.

Reference: SparseAttentionBackend.sparse_decode (fapool/attention/sparse.py); tests:
tests/sparse/test_triton_select.py; benchmark: benchmarks/sparse_gpu.py. The head count is
read from the grid (not a constexpr), so a worker holding any subset of heads reuses one
compiled kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fapool.attention.triton_decode import LN2, LOG2E, _decode_reduce_kernel, _tile_pages, auto_num_splits


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
    log2 units (-inf where no key was seen), and the heads / masks to store them with. Shared
    by the split-count kernel here and the work-balanced one (triton_balanced_decode)."""
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
def _sparse_split_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    tables,
    lens,
    qk_scale,
    num_splits,
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
    stride_ms,
    stride_mh,
    stride_mk,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = seq * tl.num_programs(1) + kvh
    n_kv = tl.load(lens + row)  # compacted visible entries of this (sequence, KV head)
    num_tiles = tl.cdiv(n_kv, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    o, lse2, heads, h_mask, d_mask = _attend_pair_tiles(
        Q, K, V, tables, row, seq, kvh, n_kv, tile_lo, tile_hi, qk_scale,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP, BLOCK_H, HEAD_DIM, BLOCK_D, PAGE, BLOCK_N,
    )
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    if SINGLE_SPLIT:
        tl.store(
            OUT + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(OUT.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
        tl.store(LSE + seq * stride_lt + heads, lse2 * LN2, mask=h_mask)
    else:
        mid = seq * stride_ms + heads * stride_mh + split * stride_mk
        tl.store(MID_O + mid[:, None] + offs_d[None, :], o, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(MID_LSE + mid // BLOCK_D, lse2, mask=h_mask)


def sparse_paged_decode(
    q, k_cache, v_cache, pages, lens, scale, num_splits=None, block_n=64, num_warps=4, num_stages=2
):
    """q [B, Hq, D] (one decode query per sequence), pages [B, Hkv, K] int32, lens [B, Hkv] int32
    -> (out [B, Hq, D], lse [B, Hq] float32)."""
    num_seqs, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if pages.shape[:2] != (num_seqs, num_kv_heads) or lens.shape != (num_seqs, num_kv_heads):
        raise ValueError(
            f"pages {tuple(pages.shape)} / lens {tuple(lens.shape)} must start with ({num_seqs}, {num_kv_heads})"
        )
    if q.dtype != k_cache.dtype or q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and caches must share a dtype and have a contiguous head dimension")
    group = num_heads // num_kv_heads
    tables = pages.reshape(num_seqs * num_kv_heads, -1).contiguous()
    lens = lens.reshape(-1).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((num_seqs, num_heads), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    if num_splits is None:
        num_splits = auto_num_splits(
            num_seqs, num_kv_heads, tables.shape[1] * page, head_dim, q.element_size(), q.device
        )
    single = num_splits == 1
    if single:
        mid_o = mid_lse = out
        strides_m = (0, 0, 0)
    else:
        mid_o = torch.empty((num_seqs, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        strides_m = mid_o.stride()[:3]
    _sparse_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        lse,
        mid_o,
        mid_lse,
        tables,
        lens,
        scale * LOG2E,
        num_splits,
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
        *strides_m,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        qsl = torch.arange(num_seqs + 1, device=q.device, dtype=torch.int32)
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            lse,
            mid_o,
            mid_lse,
            qsl,
            num_splits,
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            *strides_m,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out, lse
