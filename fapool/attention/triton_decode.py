"""Paged decode attention in Triton: split-KV flash-decoding with an LSE output, GQA-aware.

One query token per sequence. Stage 1 runs one program per (sequence, KV head, split): it loads
the `group` query heads that share the KV head as one [BLOCK_H, D] tile (padded to 16 rows for
the tensor cores), so each KV page is read from memory once for all of them, and streams its
share of the sequence's pages with an online softmax. Stage 2 merges the splits with LSE
weights, exactly as `merge_partials` merges shards. With one split, stage 1 writes the final
result and stage 2 is skipped.

Split count (`choose_num_splits`): the launch runs in waves of `resident programs per SM x SMs`
programs, and a wave lasts as long as its longest split. More splits shorten each split but add
waves, a fixed per-program cost (prologue, pipeline fill, epilogue) and the stage-2 pass, so the
count minimises  waves(S) * (tiles_per_split(S) + PROGRAM_COST_TILES) + REDUCE_COST_TILES*[S>1].
A nearly empty last wave is what the model avoids: one more split that spills into a second,
mostly idle wave is slower than a full single wave (benchmarks/RESULTS.md, kernels sweep). The
count is a runtime argument, so CUDA graphs can pin it; choosing it costs a cached lookup, since
host time per call matters at small batch. One case the model misjudges: from about 1.5 (sequence,
KV head) pairs per SM up to what one wave of 3-stage programs holds, one unsplit program per
pair with a third stage in flight already keeps the memory busy, and splitting only adds the
stage-2 pass and per-program costs (`unsplit_one_wave`; benchmarks/RESULTS.md, decode_peer_sweep).

An FP8 (e4m3) cache is read as is and widened in registers, to fp16 for a 16-bit query (e4m3
converts to fp16 natively, and P in [0, 1] and the query fit fp16 well) or to the float32
query's dtype: the K scale folds into the softmax scale and the V scale into the output, so the
loop reads half the bytes. K widens in the dot operand's layout, where Triton places it
(ldmatrix on the e4m3 bytes, then the pair conversion). V must not: its reduction axis, the
tokens, is not the contiguous one, no ldmatrix transposes 8-bit elements, and there Triton read
it from shared memory one byte at a time. It widens in its load layout instead (`_e4m3_to_f16`)
and reaches the MMA as fp16 through shared memory and a transposing ldmatrix, as a bf16 V does.
With half the bytes a token, the FP8 loop handles twice the tokens per byte, and the per-tile
exchange between warps (the row max and sum of the scores, P moved to the other warps for P@V)
holds it back. From FP8_WARP_SPLIT_MIN_KV keys on, an FP8 cache takes the warp-split kernel
(`_decode_split_kernel_warps`): each warp a slice of every tile's tokens with its own online
softmax (3-D dots, batch = warps), the warps' states merged once after the loop. Below that, a
program's few tiles make that kernel's smaller tiles and final merge cost more than they save.

An int8 cache (per-token scales, kv_quant) runs the same kernels and tiles: K and V widen to
fp16 by integer tricks (`_int8_to_f16`), each token's K scale multiplies its logits and its V
scale its probability before P@V, taken over the tile's largest V scale so that P stays in
fp16's range, the product multiplied back; the scales are loaded a tile ahead, as the page ids.

Reference: `fapool.attention.torch_ref.TorchReferenceBackend`; test:
tests/attention/test_triton_kernels.py; benchmark: benchmarks/bench_attention_kernels.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fapool.attention.kv_quant import check_scale_pages
from fapool.layers.triton_pdl import launch_dependents, pdl_enabled, pdl_launch, wait_predecessor

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: kernels read it

# Tunables (benchmarks/bench_attention_kernels.py --sweep; figures in benchmarks/RESULTS.md):
# 64-token tiles, 4 warps, 2 stages (K/V prefetched one tile ahead, 4 programs per SM), with the
# split count chosen below, are close to the best swept configuration on every shape; deeper
# prefetch (3-4 stages) costs occupancy and gains nothing once the SMs are full.
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2
# An FP8 cache: 128-token tiles (the bytes of a 64-token bf16 tile), 4 warps, 3 stages: 104 KB,
# 2 programs an SM. From FP8_WARP_SPLIT_MIN_KV keys on, the warp-split kernel: 2 warps of 16
# tokens each a tile, 3 stages: 24 KB and 168 registers, 6 programs an SM. Each the fastest in
# the H200 probes and sweeps on its side of 8K keys (benchmarks/RESULTS.md).
FP8_BLOCK_N, FP8_NUM_WARPS, FP8_NUM_STAGES = 128, 4, 3
FP8_WS_BLOCK_N, FP8_WS_NUM_WARPS, FP8_WS_NUM_STAGES = 32, 2, 3
FP8_WARP_SPLIT_MIN_KV = 8192
ONE_WAVE_STAGES = 3  # stages of the unsplit one-wave launch (unsplit_one_wave)
ONE_WAVE_MIN_PAIRS_PER_SM = 1.5
PROGRAM_COST_TILES = 2  # fixed cost of one program, in KV tiles' worth of time
REDUCE_COST_TILES = 1  # stage 2 (second launch, mid-buffer round trip)
MAX_SPLITS = 64
SMEM_PER_SM = 228 * 1024  # Hopper (H100, H200)
REGS_PER_SM = 65536


@triton.jit
def _tile_pages(table, t, offs_n, n_kv, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Page id of each row of KV tile t, offs_n its rows' offsets in the tile (any shape; int64
    for the address arithmetic); 0 past the end."""
    pos = t * BLOCK_N + offs_n
    if BLOCK_N <= PAGE:  # the whole tile lies in one page: one table read
        page = tl.load(table + (t * BLOCK_N) // PAGE, mask=t * BLOCK_N < n_kv, other=0)
    else:
        page = tl.load(table + pos // PAGE, mask=pos < n_kv, other=0)
    return page.to(tl.int64)


@triton.jit
def _tile_scales(K_SCALES, V_SCALES, page, t, offs_n, n_kv, stride_sb, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """An int8 cache's K and V scales of tile t's tokens (0 past the end)."""
    pos = t * BLOCK_N + offs_n
    rows = page * stride_sb + pos % PAGE
    return tl.load(K_SCALES + rows, mask=pos < n_kv, other=0.0), tl.load(V_SCALES + rows, mask=pos < n_kv, other=0.0)


@triton.jit
def _e4m3_to_f16(x):
    """e4m3 -> fp16, four elements per call with the native pair conversion. Not pure, so Triton
    keeps it where it stands (in the load's layout) instead of moving it into the dot operand's
    layout."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r",
        [x.to(tl.uint8, bitcast=True)],
        dtype=tl.float16,
        is_pure=False,
        pack=4,
    )


@triton.jit
def _int8_to_f16(x, PINNED: tl.constexpr):
    """int8 -> fp16, four elements per call in full-rate ALU instructions (the int-to-float
    conversion runs at a quarter rate): each byte, its sign bit flipped, becomes the low byte of
    the fp16 1024 + (x + 128); subtracting 1152 leaves x, exactly. PINNED keeps it where it
    stands, as _e4m3_to_f16 (V); unpinned, Triton places it, as it places the e4m3 K conversion
    (K: the faster of the two in the H200 probes, benchmarks/RESULTS.md)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 u, c; xor.b32 u, $2, 0x80808080; mov.b32 c, 0x64806480;"
        " prmt.b32 $0, u, 0x64646464, 0x5140; prmt.b32 $1, u, 0x64646464, 0x7362;"
        " sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; }",
        "=r,=r,r",
        [x.to(tl.uint8, bitcast=True)],
        dtype=tl.float16,
        is_pure=not PINNED,
        pack=4,
    )


@triton.jit
def _widen(x, dtype: tl.constexpr):
    """A V tile in the dtype of the dots: e4m3 or int8 under fp16 dots widens where it was
    loaded."""
    if x.dtype == tl.float8e4nv and dtype == tl.float16:
        return _e4m3_to_f16(x)
    if x.dtype == tl.int8 and dtype == tl.float16:
        return _int8_to_f16(x, True)
    return x.to(dtype)


@triton.jit
def _widen_k(x, dtype: tl.constexpr):
    """A K tile in the dtype of the dots, converted where Triton places it."""
    if x.dtype == tl.int8 and dtype == tl.float16:
        return _int8_to_f16(x, False)
    return x.to(dtype)


@triton.jit
def _split_tiles(query_pos_start, kv_lens, kv_start, seq, split, num_splits, BLOCK_N: tl.constexpr):
    """(visible keys, first tile, end tile) of this split: entry i is visible when i < kv_len
    and kv_start + i <= q_pos, i.e. i < n_kv."""
    q_pos = tl.load(query_pos_start + seq)
    n_kv = tl.minimum(tl.load(kv_lens + seq), q_pos - tl.load(kv_start + seq) + 1)
    n_kv = tl.maximum(n_kv, 0)
    num_tiles = tl.cdiv(n_kv, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    return n_kv, tile_lo, tl.minimum(tile_lo + tiles_per_split, num_tiles)


@triton.jit
def _load_q(Q, tok, heads, h_mask, offs_d, d_mask, stride_qt, stride_qh, FP16_DOT: tl.constexpr):
    """A KV head's query rows [BLOCK_H, BLOCK_D] (fp16 when an 8-bit cache's dots run in fp16)."""
    q = tl.load(
        Q + tok * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP16_DOT:
        q = q.to(tl.float16)
    return q


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    query_start_loc,
    query_pos_start,
    kv_lens,
    kv_start,
    block_tables,
    qk_scale,
    v_scale,
    num_splits,
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
    FP16_DOT: tl.constexpr,
    INT8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_predecessor(USE_PDL)  # before the early return too: see fapool.layers.triton_pdl
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(query_start_loc + seq)
    if tl.load(query_start_loc + seq + 1) - tok != 1:
        return  # not a decode sequence (mixed batch): the prefill kernel owns it

    n_kv, tile_lo, tile_hi = _split_tiles(query_pos_start, kv_lens, kv_start, seq, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = _load_q(Q, tok, heads, h_mask, offs_d, d_mask, stride_qt, stride_qh, FP16_DOT)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables + seq * stride_bt
    v_base = V + kvh * stride_vh + offs_d[None, :]
    k_base = K + kvh * stride_kh + offs_d[None, :]
    K_SCALES += kvh * stride_sh
    V_SCALES += kvh * stride_sh

    # The page ids of tile t+1 are read during tile t: the K/V loads then hang off a loop-carried
    # value rather than a load of the same iteration, so the pipeliner buffers them
    # num_stages - 1 tiles deep (with the table load in the loop, it spent a stage on it).
    page_next = _tile_pages(table, tile_lo, offs_n, n_kv, PAGE, BLOCK_N)
    if INT8:  # the scales a tile ahead too, as the page ids
        ks_next, vs_next = _tile_scales(K_SCALES, V_SCALES, page_next, tile_lo, offs_n, n_kv, stride_sb, PAGE, BLOCK_N)
    for t in range(tile_lo, tile_hi):
        page = page_next
        page_next = _tile_pages(table, t + 1, offs_n, n_kv, PAGE, BLOCK_N)
        if INT8:
            ks, vs = ks_next, vs_next
            ks_next, vs_next = _tile_scales(
                K_SCALES, V_SCALES, page_next, t + 1, offs_n, n_kv, stride_sb, PAGE, BLOCK_N
            )
        pos = t * BLOCK_N + offs_n
        n_mask = pos < n_kv
        k_rows = page * stride_kb + (pos % PAGE) * stride_kt
        v_rows = page * stride_vb + (pos % PAGE) * stride_vt
        kv_mask = n_mask[:, None] if BLOCK_D == HEAD_DIM else n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + k_rows[:, None], mask=kv_mask, other=0.0)
        k = _widen_k(k, q.dtype)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_H, BLOCK_N], log2 units
        if INT8:  # each token's K scale
            qk = qk * ks[None, :]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _widen(tl.load(v_base + v_rows[:, None], mask=kv_mask, other=0.0), q.dtype)
        if INT8:  # each token's V scale on its probability, over the tile's largest (fp16's range)
            v_top = tl.maximum(tl.max(vs, 0), 1e-30)
            acc = acc * alpha[:, None] + tl.dot((p * (vs / v_top)[None, :]).to(q.dtype), v) * v_top
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    launch_dependents(USE_PDL)
    _store_split(
        acc, m_i, l_i, v_scale, OUT, LSE, MID_O, MID_LSE, seq, tok, split, heads, h_mask, offs_d, d_mask,
        stride_ot, stride_oh, stride_lt, stride_ms, stride_mh, stride_mk, BLOCK_D, SINGLE_SPLIT,
    )


@triton.jit
def _store_split(
    acc, m_i, l_i, v_scale, OUT, LSE, MID_O, MID_LSE, seq, tok, split, heads, h_mask, offs_d, d_mask,
    stride_ot, stride_oh, stride_lt, stride_ms, stride_mh, stride_mk,
    BLOCK_D: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """A split's normalised output and lse (log2 units in, natural log out): the final result
    with one split, else its partial for the reduce kernel."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc * (v_scale / l_safe[:, None])
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))  # log2 units
    if SINGLE_SPLIT:
        tl.store(
            OUT + tok * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(OUT.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
        tl.store(LSE + tok * stride_lt + heads, lse2 * LN2, mask=h_mask)
    else:
        mid = seq * stride_ms + heads * stride_mh + split * stride_mk
        tl.store(MID_O + mid[:, None] + offs_d[None, :], o, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(MID_LSE + mid // BLOCK_D, lse2, mask=h_mask)


@triton.jit
def _decode_split_kernel_warps(
    Q,
    K,
    V,
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    query_start_loc,
    query_pos_start,
    kv_lens,
    kv_start,
    block_tables,
    qk_scale,
    v_scale,
    num_splits,
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
    FP16_DOT: tl.constexpr,
    INT8: tl.constexpr,
    USE_PDL: tl.constexpr,
    WARPS: tl.constexpr,
):
    """_decode_split_kernel with each of the WARPS warps running its own online softmax over
    BLOCK_N // WARPS tokens of every tile (3-D dots with the warps as the batch, so
    no row max, sum or P crosses warps inside the loop); the warps' states merge after it."""
    NW: tl.constexpr = BLOCK_N // WARPS  # tokens of a tile per warp
    wait_predecessor(USE_PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(query_start_loc + seq)
    if tl.load(query_start_loc + seq + 1) - tok != 1:
        return  # not a decode sequence (mixed batch): the prefill kernel owns it

    n_kv, tile_lo, tile_hi = _split_tiles(query_pos_start, kv_lens, kv_start, seq, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, WARPS)[:, None] * NW + tl.arange(0, NW)[None, :]  # [WARPS, NW] of the tile
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = _load_q(Q, tok, heads, h_mask, offs_d, d_mask, stride_qt, stride_qh, FP16_DOT)
    q = tl.broadcast_to(q[None, :, :], (WARPS, BLOCK_H, BLOCK_D))

    m_i = tl.full([WARPS, BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([WARPS, BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([WARPS, BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables + seq * stride_bt
    k_base = K + kvh * stride_kh + offs_d[None, None, :]
    v_base = V + kvh * stride_vh + offs_d[None, None, :]
    kv_dmask = d_mask[None, None, :]
    K_SCALES += kvh * stride_sh
    V_SCALES += kvh * stride_sh

    page_next = _tile_pages(table, tile_lo, offs_n, n_kv, PAGE, BLOCK_N)  # a tile ahead, as above
    if INT8:
        ks_next, vs_next = _tile_scales(K_SCALES, V_SCALES, page_next, tile_lo, offs_n, n_kv, stride_sb, PAGE, BLOCK_N)
    for t in range(tile_lo, tile_hi):
        page = page_next
        page_next = _tile_pages(table, t + 1, offs_n, n_kv, PAGE, BLOCK_N)
        if INT8:
            ks, vs = ks_next, vs_next
            ks_next, vs_next = _tile_scales(
                K_SCALES, V_SCALES, page_next, t + 1, offs_n, n_kv, stride_sb, PAGE, BLOCK_N
            )
        pos = t * BLOCK_N + offs_n
        n_mask = pos < n_kv
        k_rows = page * stride_kb + (pos % PAGE) * stride_kt
        v_rows = page * stride_vb + (pos % PAGE) * stride_vt
        kv_mask = n_mask[:, :, None] if BLOCK_D == HEAD_DIM else n_mask[:, :, None] & kv_dmask
        k = tl.load(k_base + k_rows[:, :, None], mask=kv_mask, other=0.0)
        k = _widen_k(k, q.dtype)
        qk = tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale  # [WARPS, BLOCK_H, NW], log2 units
        if INT8:
            qk = qk * ks[:, None, :]
        qk = tl.where(n_mask[:, None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 2))
        p = tl.exp2(qk - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 2)
        v = _widen(tl.load(v_base + v_rows[:, :, None], mask=kv_mask, other=0.0), q.dtype)
        if INT8:  # as in _decode_split_kernel, each warp over its own slice's largest V scale
            v_top = tl.maximum(tl.max(vs, 1), 1e-30)
            pv = tl.dot((p * (vs / v_top[:, None])[:, None, :]).to(q.dtype), v)
            acc = acc * alpha[:, :, None] + pv * v_top[:, None, None]
        else:
            acc = acc * alpha[:, :, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    launch_dependents(USE_PDL)

    # A warp that saw no key keeps m = -1e30 and l = 0: its weight is 0 beside any that did.
    m = tl.max(m_i, 0)
    w = tl.exp2(m_i - m[None, :])
    _store_split(
        tl.sum(acc * w[:, :, None], 0), m, tl.sum(l_i * w, 0), v_scale, OUT, LSE, MID_O, MID_LSE, seq, tok,
        split, heads, h_mask, offs_d, d_mask, stride_ot, stride_oh, stride_lt, stride_ms, stride_mh, stride_mk,
        BLOCK_D, SINGLE_SPLIT,
    )


@triton.jit
def _decode_reduce_kernel(
    OUT,
    LSE,
    MID_O,
    MID_LSE,
    query_start_loc,
    num_splits,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_ms,
    stride_mh,
    stride_mk,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(query_start_loc + seq)
    if tl.load(query_start_loc + seq + 1) - tok != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    mid = seq * stride_ms + head * stride_mh + offs_s * stride_mk
    lse2 = tl.load(MID_LSE + mid // BLOCK_D, mask=s_mask, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_safe)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(
        MID_O + mid[:, None] + offs_d[None, :], mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0
    )
    seen = total > 0.0
    total_safe = tl.where(seen, total, 1.0)
    out = tl.sum(o * w[:, None], 0) / total_safe
    tl.store(
        OUT + tok * stride_ot + head * stride_oh + offs_d,
        out.to(OUT.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    tl.store(
        LSE + tok * stride_lt + head, tl.where(seen, (m_safe + tl.log2(total_safe)) * LN2, float("-inf"))
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def resident_programs_per_sm(
    block_n: int,
    block_d: int,
    num_stages: int,
    num_warps: int,
    elem_size: int,
    warp_split: bool = False,
    int8: bool = False,
) -> int:
    """Programs of the split kernel an SM holds at once. Fitted to what Triton 3.6 compiles for
    sm_90 (ptxas -v; the bench JSON's "compiled"): num_stages - 1 buffered K and V tiles plus
    ~7 KB of shared memory (71.7 KB at BLOCK_N 64, 3 stages) and about 40 + BLOCK_N * D / 128
    registers a thread (105 at BLOCK_N 64, 72 at 32, 165 at 128, head dim 128), with an FP8
    cache one more fp16 tile (where the widened V is staged for ldmatrix; 104 KB at BLOCK_N 128,
    3 stages; 143 registers). The warp-split kernel exchanges nothing between warps: its
    buffered tiles, the FP8 staging tile and the SM's 1 KB a program (24 KB + 1 KB at BLOCK_N
    32, 3 stages), and about 40 + D registers a thread (each warp holds a [16, D] accumulator;
    168 at head dim 128). An int8 cache's per-token scales (prefetched a tile ahead, in the
    layouts of the logits and of P) take 66 registers more in the warp-split kernel (234) and 48
    in the other (191)."""
    staged = 2 * block_n * block_d if elem_size == 1 else 0
    tiles = max(1, num_stages - 1) * 2 * block_n * block_d * elem_size + staged
    if warp_split:
        smem, regs = tiles + 1024, (40 + block_d + 66 * int8) * 32 * num_warps
    else:
        smem, regs = tiles + 7168, (40 + block_n * block_d // 128 + 48 * int8) * 32 * num_warps
    return max(1, min(SMEM_PER_SM // smem, REGS_PER_SM // regs, 64 // num_warps))


@functools.lru_cache(maxsize=4096)
def choose_num_splits(num_pairs: int, num_tiles: int, capacity: int) -> int:
    """Splits for `num_pairs` (sequence, KV head) pairs of up to `num_tiles` KV tiles, with
    `capacity` programs resident on the GPU. For w waves the best count is the largest that
    still fits in w waves, so only those candidates are costed."""
    limit = max(1, min(MAX_SPLITS, num_tiles))
    candidates = {1} | {max(1, min(limit, w * capacity // num_pairs)) for w in range(1, 9)}
    best, best_cost = 1, None
    for splits in sorted(candidates):
        waves = triton.cdiv(num_pairs * splits, capacity)
        cost = waves * (triton.cdiv(num_tiles, splits) + PROGRAM_COST_TILES) + REDUCE_COST_TILES * (
            splits > 1
        )
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


@functools.lru_cache(maxsize=1024)
def unsplit_one_wave(num_pairs: int, block_d: int, num_sms: int) -> bool:
    """Whether a bf16/fp16 cache's default launch runs one unsplit program per pair at
    ONE_WAVE_STAGES: enough pairs to keep ~1.5 programs on every SM, few enough for one wave."""
    per_sm = resident_programs_per_sm(DEFAULT_BLOCK_N, block_d, ONE_WAVE_STAGES, DEFAULT_NUM_WARPS, 2)
    return ONE_WAVE_MIN_PAIRS_PER_SM * num_sms <= num_pairs <= per_sm * num_sms


def fp8_warp_split(max_kv_len: int) -> bool:
    """Whether an FP8 cache's decode runs the warp-split kernel, for a batch's longest context."""
    return max_kv_len >= FP8_WARP_SPLIT_MIN_KV


def decode_config(elem_size: int, warp_split: bool = False) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) of the decode kernel for a cache of `elem_size` bytes."""
    if elem_size == 1:
        if warp_split:
            return FP8_WS_BLOCK_N, FP8_WS_NUM_WARPS, FP8_WS_NUM_STAGES
        return FP8_BLOCK_N, FP8_NUM_WARPS, FP8_NUM_STAGES
    return DEFAULT_BLOCK_N, DEFAULT_NUM_WARPS, DEFAULT_NUM_STAGES


def auto_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_kv_len: int,
    head_dim: int,
    elem_size: int,
    device: torch.device,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    warp_split: bool | None = None,
    int8: bool = False,
) -> int:
    """The split count paged_decode picks when none is given (the cache's own kernel and tile
    settings where none are given; `int8`: an int8 cache, whose scales cost registers)."""
    block_d = triton.next_power_of_2(head_dim)
    pairs = max(1, num_seqs * num_kv_heads)
    if warp_split is None:
        warp_split = elem_size == 1 and fp8_warp_split(max_kv_len)
    default_tiles = block_n is num_warps is num_stages is None
    if elem_size == 2 and default_tiles and not warp_split and unsplit_one_wave(pairs, block_d, _num_sms(device)):
        return 1
    dflt = decode_config(elem_size, warp_split)
    block_n, num_warps, num_stages = block_n or dflt[0], num_warps or dflt[1], num_stages or dflt[2]
    per_sm = resident_programs_per_sm(block_n, block_d, num_stages, num_warps, elem_size, warp_split, int8)
    return choose_num_splits(pairs, max(1, triton.cdiv(max_kv_len, block_n)), per_sm * _num_sms(device))


def paged_args(query, k_cache, v_cache, k_pages, v_pages, meta, out, lse) -> tuple:
    """The decode and prefill kernels' shared arguments, in their order: an int8 cache's scale
    pages and their strides (the caches in their place, strides 0, without), then the strides of
    the query, the caches, the block table, the output and the lse."""
    int8 = k_pages is not None
    return (
        k_pages if int8 else k_cache,
        v_pages if int8 else v_cache,
        k_pages.stride(0) if int8 else 0,
        k_pages.stride(1) if int8 else 0,
        *query.stride()[:2],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        meta.block_tables.stride(0),
        *out.stride()[:2],
        lse.stride(0),
    )


def fp16_dot(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """An 8-bit cache under a 16-bit query: the kernels compute its dots in fp16."""
    return k_cache.dtype in (torch.float8_e4m3fn, torch.int8) and query.dtype in (torch.float16, torch.bfloat16)


def _check(query, k_cache, v_cache, meta) -> None:
    if query.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "expected query [T,H,D] and caches [blocks,block_size,Hkv,D], "
            f"got {tuple(query.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1:]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"head mismatch: query {query.shape}, cache {k_cache.shape}")
    if page < 16 or page & (page - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {page}")
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension of query and caches must be contiguous")
    byte_cache = k_cache.dtype in (torch.float8_e4m3fn, torch.int8)  # read in the query's dtype
    if (query.dtype != k_cache.dtype and not byte_cache) or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: {query.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if meta.block_tables.dtype != torch.int32 or meta.query_start_loc.dtype != torch.int32:
        raise ValueError("block_tables and query_start_loc must be int32")


def _check_int8(k_cache, k_pages, v_pages) -> bool:
    """Whether the cache is int8 (then with its scale pages, kv_quant.check_scale_pages)."""
    if k_cache.dtype != torch.int8:
        return False
    check_scale_pages(k_cache, k_pages, v_pages)
    return True


def paged_decode(
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
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dot_fp16: bool | None = None,
    warp_split: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over paged KV -> (out [T,H,D], lse [T,H] float32, natural log).

    Only sequences with exactly one query token are computed; the rows of the others are left
    untouched in `out`/`lse` (in a mixed batch the prefill kernel writes them). `k_scale` and
    `v_scale` multiply what an FP8 cache holds, `k_pages` / `v_pages` each token's row of an
    int8 cache (kv_quant). `warp_split` picks the warp-split kernel (None: for an 8-bit cache
    from FP8_WARP_SPLIT_MIN_KV keys in meta.max_kv_len on; CUDA graphs pin it with num_splits).
    """
    _check(query, k_cache, v_cache, meta)
    int8 = _check_int8(k_cache, k_pages, v_pages)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = meta.num_seqs
    if warp_split is None:
        warp_split = k_cache.element_size() == 1 and fp8_warp_split(meta.max_kv_len)
    dflt = decode_config(k_cache.element_size(), warp_split)
    default_tiles = block_n is num_warps is num_stages is None
    block_n, num_warps, num_stages = block_n or dflt[0], num_warps or dflt[1], num_stages or dflt[2]
    if out is None:
        out = torch.empty_like(query)
    if lse is None:
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=query.device)
    if num_seqs == 0 or num_tokens == 0:
        return out, lse
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(16, triton.next_power_of_2(group))
    if num_splits is None:
        num_splits = auto_num_splits(
            num_seqs,
            num_kv_heads,
            meta.max_kv_len,
            head_dim,
            k_cache.element_size(),
            query.device,
            block_n,
            num_warps,
            num_stages,
            warp_split,
            int8,
        )
    single = num_splits == 1
    if (
        single
        and default_tiles
        and k_cache.element_size() == 2
        and not warp_split
        and unsplit_one_wave(num_seqs * num_kv_heads, block_d, _num_sms(query.device))
    ):
        num_stages = ONE_WAVE_STAGES
    if single:
        mid_o = mid_lse = out  # unused
        strides_m = (0, 0, 0)
    else:
        mid_o = torch.empty(
            (num_seqs, num_heads, num_splits, block_d), dtype=torch.float32, device=query.device
        )
        # The kernels index mid_lse with mid_o's row offset // block_d: both contiguous.
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
        strides_m = mid_o.stride()[:3]
    grid = (num_seqs, num_kv_heads, num_splits)
    pdl = pdl_enabled(query)
    if warp_split and (block_n % num_warps or block_n // num_warps < 16):
        raise ValueError(f"the warp-split kernel needs block_n a multiple of 16 * num_warps, got {block_n}, {num_warps}")
    kernel, extra = (_decode_split_kernel_warps, {"WARPS": num_warps}) if warp_split else (_decode_split_kernel, {})
    kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        lse,
        mid_o,
        mid_lse,
        meta.query_start_loc,
        meta.query_pos_start,
        meta.kv_lens,
        meta.kv_start,
        meta.block_tables,
        scale * k_scale * LOG2E,
        v_scale,
        num_splits,
        *paged_args(query, k_cache, v_cache, k_pages if int8 else None, v_pages, meta, out, lse),
        *strides_m,
        GROUP=group,
        BLOCK_H=block_h,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        FP16_DOT=fp16_dot(query, k_cache) if dot_fp16 is None else dot_fp16,
        INT8=int8,
        USE_PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **extra,
        **pdl_launch(pdl),
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            lse,
            mid_o,
            mid_lse,
            meta.query_start_loc,
            num_splits,
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            *strides_m,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            USE_PDL=pdl,
            num_warps=4,
            **pdl_launch(pdl),
        )
    return out, lse
