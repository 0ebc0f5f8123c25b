"""Paged prefill / chunked-prefill attention in Triton (FlashAttention-2 tiling), with LSE output.

One program per (query head, query tile of BLOCK_M tokens, sequence). The tile's queries sit at
absolute positions query_pos_start + j and attend, causally, over the sequence's paged KV
(a cached prefix, the chunk itself, or a shard of either: KV entry i sits at kv_start + i).
The KV loop has two phases: tiles every row of the query tile sees (no mask), then the tiles
on the causal diagonal and at the end of the KV (masked). Query tiles run heaviest-first so the
long causal rows do not trail at the end of the launch. An FP8 cache is widened to the query's
dtype (fp16 under a 16-bit query) as it is loaded, its scales folded into the softmax scale (K)
and the output (V); an int8 cache is widened to the query's dtype, each token's K scale
multiplying its logits and its V scale its probabilities.

Reference: `fapool.attention.torch_ref.TorchReferenceBackend`; test:
tests/attention/test_triton_kernels.py; benchmark: benchmarks/bench_attention_kernels.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fapool.attention.triton_decode import LN2, LOG2E, _check, _check_int8, fp16_dot, paged_args

# Chosen by sweep (benchmarks/bench_attention_kernels.py --sweep; figures in
# benchmarks/RESULTS.md): 128 x 128 tiles, 8 warps, 3 stages were the fastest over 4K and 16K
# prompts. Query chunks of at most 64 tokens use 64-row tiles (SMALL_CONFIG).
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 128
DEFAULT_NUM_WARPS = 8
DEFAULT_NUM_STAGES = 3
SMALL_CONFIG = dict(block_m=64, block_n=64, num_warps=4, num_stages=4)


@triton.jit
def _kv_tile(
    K,
    V,
    K_SCALES,
    V_SCALES,
    table,
    start,
    offs_n,
    offs_d,
    kv_len,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_sb,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    INT8: tl.constexpr,
):
    """A KV tile's K and V rows, and with INT8 their tokens' K and V scales (else 1)."""
    pos = start + offs_n
    if BLOCK_N <= PAGE:
        page = tl.load(table + start // PAGE).to(tl.int64)
    else:
        if MASKED:
            page = tl.load(table + pos // PAGE, mask=pos < kv_len, other=0).to(tl.int64)
        else:
            page = tl.load(table + pos // PAGE).to(tl.int64)
    k_ptr = K + (page * stride_kb + (pos % PAGE) * stride_kt)[:, None] + offs_d[None, :]
    v_ptr = V + (page * stride_vb + (pos % PAGE) * stride_vt)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptr, mask=(pos < kv_len)[:, None], other=0.0)
        v = tl.load(v_ptr, mask=(pos < kv_len)[:, None], other=0.0)
    else:
        k = tl.load(k_ptr)
        v = tl.load(v_ptr)
    ks = 1.0
    vs = 1.0
    if INT8:
        s_rows = page * stride_sb + pos % PAGE
        ks = tl.load(K_SCALES + s_rows, mask=pos < kv_len, other=0.0)
        vs = tl.load(V_SCALES + s_rows, mask=pos < kv_len, other=0.0)
    return k, v, ks, vs


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    query_start_loc,
    query_pos_start,
    kv_lens,
    kv_start,
    block_tables,
    skip,
    qk_scale,
    v_scale,
    K_SCALES,
    V_SCALES,
    stride_sb,
    stride_sh,
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
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    FP16_DOT: tl.constexpr,
    INT8: tl.constexpr,
):
    head = tl.program_id(0)
    m_blk = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest query tiles first
    seq = tl.program_id(2)
    q0 = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q0
    m_start = m_blk * BLOCK_M
    if m_start >= q_len:
        return
    if SKIP_DECODE and q_len == 1:  # the decode kernel owns it
        return
    if HAS_SKIP:  # another kernel (cuDNN) owns it
        if tl.load(skip + seq) != 0:
            return
    # Row j sees KV entries i with i < kv_len and i <= diag + j.
    diag = tl.load(query_pos_start + seq) - tl.load(kv_start + seq)
    kv_len = tl.load(kv_lens + seq)
    last_row = tl.minimum(m_start + BLOCK_M, q_len) - 1
    hi = tl.maximum(tl.minimum(kv_len, diag + last_row + 1), 0)
    full = tl.maximum(tl.minimum(kv_len, diag + m_start + 1), 0)
    full = (full // BLOCK_N) * BLOCK_N  # tiles below this every row sees in full

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q = tl.load(
        Q + (q0 + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    if FP16_DOT:  # an FP8 cache under a 16-bit query (see triton_decode)
        q = q.to(tl.float16)

    kvh = head // GROUP
    K = K + kvh * stride_kh
    V = V + kvh * stride_vh
    K_SCALES += kvh * stride_sh
    V_SCALES += kvh * stride_sh
    table = block_tables + seq * stride_bt
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start in range(0, full, BLOCK_N):
        k, v, ks, vs = _kv_tile(
            K, V, K_SCALES, V_SCALES, table, start, offs_n, offs_d, kv_len, stride_kb, stride_kt, stride_vb,
            stride_vt, stride_sb, PAGE, BLOCK_N, False, INT8,
        )
        k, v = k.to(q.dtype), v.to(q.dtype)  # an 8-bit cache widens here
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if INT8:
            qk = qk * ks[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:
            p = p * vs[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    for start in range(full, hi, BLOCK_N):
        k, v, ks, vs = _kv_tile(
            K, V, K_SCALES, V_SCALES, table, start, offs_n, offs_d, kv_len, stride_kb, stride_kt, stride_vb,
            stride_vt, stride_sb, PAGE, BLOCK_N, True, INT8,
        )
        k, v = k.to(q.dtype), v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if INT8:
            qk = qk * ks[None, :]
        pos = start + offs_n
        visible = (pos[None, :] <= (diag + offs_m)[:, None]) & (pos < kv_len)[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # stays -1e30 for rows that saw nothing yet
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:
            p = p * vs[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc * (v_scale / l_safe[:, None])
    tok = q0 + offs_m
    tl.store(
        OUT + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(OUT.dtype.element_ty),
        mask=m_mask[:, None],
    )
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(LSE + tok * stride_lt + head, lse, mask=m_mask)


def paged_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    k_pages: torch.Tensor | None = None,
    v_pages: torch.Tensor | None = None,
    skip_decode: bool = False,
    skip: torch.Tensor | None = None,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's query chunk over its paged KV -> (out, lse).

    With `skip_decode`, sequences with a single query token are left untouched (the decode
    kernel handles them in a mixed batch); so are those where `skip` ([num_seqs] int8 on the
    device) is nonzero. `max_query_len` bounds the chunks left to this kernel (default: all).
    Scales as in paged_decode.
    """
    _check(query, k_cache, v_cache, meta)
    int8 = _check_int8(k_cache, k_pages, v_pages)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"prefill needs a power-of-two head_dim >= 16, got {head_dim}")
    if out is None:
        out = torch.empty_like(query)
    if lse is None:
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=query.device)
    if meta.num_seqs == 0 or num_tokens == 0:
        return out, lse
    if max_query_len is None:
        max_query_len = meta.max_query_len
    if block_m is None:
        block_m = DEFAULT_BLOCK_M if max_query_len > 64 else SMALL_CONFIG["block_m"]
    small = block_m < DEFAULT_BLOCK_M
    if block_n is None:
        block_n = SMALL_CONFIG["block_n"] if small else DEFAULT_BLOCK_N
    if num_warps is None:
        num_warps = SMALL_CONFIG["num_warps"] if small else DEFAULT_NUM_WARPS
    if num_stages is None:
        num_stages = SMALL_CONFIG["num_stages"] if small else DEFAULT_NUM_STAGES
    grid = (num_heads, triton.cdiv(max_query_len, block_m), meta.num_seqs)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        lse,
        meta.query_start_loc,
        meta.query_pos_start,
        meta.kv_lens,
        meta.kv_start,
        meta.block_tables,
        skip if skip is not None else meta.kv_lens,
        scale * k_scale * LOG2E,
        v_scale,
        *paged_args(query, k_cache, v_cache, k_pages if int8 else None, v_pages, meta, out, lse),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SKIP_DECODE=skip_decode,
        HAS_SKIP=skip is not None,
        FP16_DOT=fp16_dot(query, k_cache) and not int8,  # int8: bf16 dots (see triton_decode)
        INT8=int8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
