"""The reference backend against dense SDPA, and the exact merge of KV shards."""

import math

import pytest
import torch
import torch.nn.functional as F
from paged_cases import shard_metadata

from fapool.attention import AttentionMetadata, TorchReferenceBackend, cpu_decode, merge_partials, merge_tree
from fapool.attention.torch_ref import write_kv_torch

needs_cc = pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler or no AVX-512 for cpu_decode.c")


def _decode_path(meta) -> str:
    """Which of the CPU decode paths the step's plan took."""
    plan = meta.host_plans["torch"]
    return "c" if plan.native else "per_seq" if plan.per_seq else "padded"


@pytest.fixture(params=["c", "aten"])
def decode_kernel(request, monkeypatch):
    """CPU decode rows through cpu_decode's C kernel, or (as without a C compiler) aten's flash paths."""
    if request.param == "c":
        if cpu_decode.load() is None:
            pytest.skip("no C compiler or no AVX-512 for cpu_decode.c")
    else:
        monkeypatch.setattr(cpu_decode, "load", lambda: None)
    return request.param


def _paged_case(seq_specs, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=0):
    """seq_specs: list of (context_len, query_len). Builds a shuffled paged cache holding the
    context plus the new tokens, and dense copies for the oracle."""
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(math.ceil((c + q) / block_size) for c, q in seq_specs) + 3
    perm = torch.randperm(total_blocks, generator=g).tolist()
    k_cache = torch.zeros(total_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, dense, queries, slots = [], [], [], []
    for ctx, ql in seq_specs:
        n = ctx + ql
        nb = math.ceil(n / block_size)
        table = [perm.pop() for _ in range(nb)]
        k = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g)
        for i in range(n):
            k_cache[table[i // block_size], i % block_size] = k[i]
            v_cache[table[i // block_size], i % block_size] = v[i]
        tables.append(table)
        dense.append((k, v))
        queries.append(torch.randn(ql, num_heads, head_dim, generator=g))
        slots += [table[i // block_size] * block_size + i % block_size for i in range(ctx, n)]
    meta = AttentionMetadata.build(
        query_lens=[q for _, q in seq_specs],
        query_pos_start=[c for c, _ in seq_specs],
        kv_lens=[c + q for c, q in seq_specs],
        block_tables=tables,
        slot_mapping=slots,
    )
    return torch.cat(queries), k_cache, v_cache, meta, dense, queries


def _sdpa_oracle(q, k, v, ctx, scale):
    """Dense causal attention where query j sits at position ctx + j."""
    ql, n = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = torch.arange(n)[None, :] <= (ctx + torch.arange(ql))[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    ).transpose(0, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1).transpose(0, 1)
    return out, lse


@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_sdpa_mixed_batch(block_size):
    specs = [(0, 7), (13, 1), (5, 1), (0, 1), (16, 9), (31, 1)]
    q, kc, vc, meta, dense, queries = _paged_case(specs, block_size=block_size)
    scale = 16**-0.5
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, scale)
    starts = meta.query_start_loc.tolist()
    for s, (ctx, _) in enumerate(specs):
        ref_out, ref_lse = _sdpa_oracle(queries[s], *dense[s], ctx, scale)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[starts[s] : starts[s + 1]], ref_lse, atol=1e-5, rtol=1e-5)


def test_write_kv_scatters_into_slots_and_skips_minus_one():
    kc = torch.zeros(3, 4, 1, 2)
    vc = torch.zeros_like(kc)
    key = torch.arange(6, dtype=torch.float32).view(3, 1, 2)
    TorchReferenceBackend().write_kv(kc, vc, key, -key, torch.tensor([5, -1, 11]))
    assert torch.equal(kc.view(-1, 1, 2)[5], key[0]) and torch.equal(kc.view(-1, 1, 2)[11], key[2])
    assert torch.equal(vc.view(-1, 1, 2)[11], -key[2])
    assert kc.abs().sum() == key[0].sum() + key[2].sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_write_in_serial_chunks_lands_every_row(dtype):
    """A prefill's rows past aten's grain size are written chunk by chunk: every slot as a
    single scatter would leave it, -1 slots skipped, in the cache's dtype."""
    g = torch.Generator().manual_seed(1)
    kc = torch.zeros(200, 16, 4, 32, dtype=dtype)
    vc = torch.zeros_like(kc)
    key, value = torch.randn(2, 1000, 4, 32, generator=g)
    slots = torch.randperm(200 * 16, generator=g)[:1000]
    slots[::7] = -1
    TorchReferenceBackend().write_kv(kc, vc, key, value, slots)
    want_k, want_v = torch.zeros_like(kc).view(-1, 4, 32), torch.zeros_like(vc).view(-1, 4, 32)
    keep = slots >= 0
    want_k[slots[keep]] = key[keep].to(dtype)
    want_v[slots[keep]] = value[keep].to(dtype)
    assert torch.equal(kc.view(-1, 4, 32), want_k) and torch.equal(vc.view(-1, 4, 32), want_v)


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_shards_merge_to_the_whole(num_shards):
    """Split each sequence's KV into contiguous position ranges (as the pool does), attend per
    shard with kv_start set, and merge: equals attention over the whole KV."""
    block_size = 4
    specs = [(21, 1), (9, 6), (40, 1)]
    q, kc, vc, meta, _, _ = _paged_case(specs, block_size=block_size)
    backend = TorchReferenceBackend()
    whole_out, whole_lse = backend.forward(q, kc, vc, meta, 0.25)
    tables = meta.block_tables.tolist()
    outs, lses = [], []
    for shard in range(num_shards):
        sub = shard_metadata(specs, tables, meta.slot_mapping.tolist(), block_size, num_shards, shard)
        o, l = backend.forward(q, kc, vc, sub, 0.25)
        outs.append(o)
        lses.append(l)
    for merge in (merge_partials, merge_tree):
        out, lse = merge(outs, lses)
        torch.testing.assert_close(out, whole_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_merge_ignores_unseen_shards():
    out = torch.randn(3, 2, 4)
    lse = torch.randn(3, 2)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    m_out, m_lse = merge_partials([out, empty_out], [lse, empty_lse])
    torch.testing.assert_close(m_out, out)
    torch.testing.assert_close(m_lse, lse)
    z_out, z_lse = merge_partials([empty_out, empty_out], [empty_lse, empty_lse])
    assert torch.equal(z_out, empty_out) and torch.isneginf(z_lse).all()


@pytest.mark.parametrize(
    "tq,kv_len,kv_start,q_pos0",
    [(37, 37, 0, 0), (16, 53, 0, 37), (5, 20, 0, 40), (9, 30, 3, 20)],
    ids=["fresh-prompt", "chunk-after-prefix", "keys-before-queries", "other-layout"],
)
def test_flash_chunk_paths_equal_the_masked_matmul(tq, kv_len, kv_start, q_pos0):
    """A multi-query row through aten's CPU flash attention (fresh prompt; cached prefix +
    causal chunk merged by lse; keys wholly before the queries) equals the plain masked matmul;
    a layout it does not cover falls back (None)."""
    from fapool.attention.torch_ref import _attend, _attend_chunk, _causal_mask

    g = torch.Generator().manual_seed(tq + kv_len)
    heads, kv_heads, dim = 6, 2, 16
    q = torch.randn(tq, heads, dim, generator=g)
    k = torch.randn(kv_len, kv_heads, dim, generator=g)
    v = torch.randn(kv_len, kv_heads, dim, generator=g)
    fast = _attend_chunk(q, k, v, q_pos0, kv_start, 0.25)
    if kv_start + kv_len - 1 > q_pos0 and kv_start + kv_len != q_pos0 + tq:
        assert fast is None
        return
    q_pos = (q_pos0 + torch.arange(tq))[None]
    k_pos = (kv_start + torch.arange(kv_len))[None]
    valid = torch.ones_like(k_pos, dtype=torch.bool)
    mask = _causal_mask(q_pos, k_pos, valid)
    want_o, want_l = _attend(q.view(tq, kv_heads, 3, dim)[None], k[None], v[None], mask, 0.25)
    assert torch.allclose(fast[0], want_o[0].reshape(tq, heads, dim), atol=1e-5)
    assert torch.allclose(fast[1], want_l[0].reshape(tq, heads), atol=1e-5)


def test_long_decode_rows_one_at_a_time_match_sdpa_and_the_batched_path(monkeypatch, decode_kernel):
    """Decode rows with >= PER_SEQUENCE_MIN_KEYS keys go one sequence at a time through the CPU
    flash kernel: the same as the oracle and as the padded batch (which a mixed batch, a
    prefill chunk beside them, still leaves for the chunk)."""
    from fapool.attention import torch_ref

    monkeypatch.setattr(torch_ref, "PER_SEQUENCE_MIN_WORK", 0)  # this small batch, one at a time
    monkeypatch.setattr(torch_ref, "PER_SEQUENCE_MIN_KEYS", 256)
    specs = [(299, 1), (700, 1), (257, 1), (40, 5)]
    q, kc, vc, meta, dense, queries = _paged_case(specs, num_heads=6, num_kv_heads=2, block_size=16)
    backend = TorchReferenceBackend()
    out, lse = backend.forward(q, kc, vc, meta, 0.3)
    assert _decode_path(meta) == ("c" if decode_kernel == "c" else "per_seq")
    row = 0
    for (ctx, ql), (k, v), qs in zip(specs, dense, queries):
        want_o, want_l = _sdpa_oracle(qs, k, v, ctx, 0.3)
        torch.testing.assert_close(out[row : row + ql], want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row : row + ql], want_l, atol=1e-5, rtol=1e-5)
        row += ql
    monkeypatch.setattr(torch_ref, "PER_SEQUENCE_MIN_KEYS", 10**9)
    meta.host_plans.clear()
    batched = backend.forward(q, kc, vc, meta, 0.3)
    assert _decode_path(meta) == ("c" if decode_kernel == "c" else "padded")
    torch.testing.assert_close(batched[0], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_seq_min_work", [0, 10**9])
def test_bf16_cache_is_attended_in_bf16_within_its_rounding(monkeypatch, per_seq_min_work, decode_kernel):
    """A bf16 cache (CPU quantization's default) goes to aten's flash kernel as bf16, every
    path: a prefill chunk over a cached prefix, decode rows one at a time and padded. Against
    the oracle on the same bf16 keys and values, within bf16's rounding of q and of P."""
    from fapool.attention import torch_ref

    monkeypatch.setattr(torch_ref, "PER_SEQUENCE_MIN_WORK", per_seq_min_work)
    monkeypatch.setattr(torch_ref, "PER_SEQUENCE_MIN_KEYS", 1)
    specs = [(299, 1), (40, 5), (0, 9), (257, 1), (18, 1)]
    q, kc, vc, meta, dense, queries = _paged_case(specs, num_heads=6, num_kv_heads=2, block_size=16)
    out, lse = TorchReferenceBackend().forward(q, kc.bfloat16(), vc.bfloat16(), meta, 0.3)
    assert _decode_path(meta) == ("c" if decode_kernel == "c" else "per_seq" if per_seq_min_work == 0 else "padded")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    row = 0
    for (ctx, ql), (k, v), qs in zip(specs, dense, queries):
        want_o, want_l = _sdpa_oracle(qs, k.bfloat16().float(), v.bfloat16().float(), ctx, 0.3)
        torch.testing.assert_close(out[row : row + ql], want_o, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[row : row + ql], want_l, atol=2e-2, rtol=2e-2)
        row += ql


@pytest.mark.parametrize("rows,keys,per_seq", [(2, 300, False), (16, 300, False), (4, 2100, False), (8, 2100, True)])
def test_decode_rows_go_one_at_a_time_only_when_the_padded_batch_is_large(rows, keys, per_seq, decode_kernel):
    """One padded flash call for a small batch (its gather stays in cache), one call per
    sequence past PER_SEQUENCE_MIN_KEYS keys and PER_SEQUENCE_MIN_WORK rows x keys; both
    equal the oracle."""
    specs = [(keys - 1 - i, 1) for i in range(rows)]
    q, kc, vc, meta, dense, queries = _paged_case(specs, num_heads=6, num_kv_heads=2, block_size=16)
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.3)
    assert _decode_path(meta) == ("c" if decode_kernel == "c" else "per_seq" if per_seq else "padded")
    for row, ((ctx, _), (k, v), qs) in enumerate(zip(specs, dense, queries)):
        want_o, want_l = _sdpa_oracle(qs, k, v, ctx, 0.3)
        torch.testing.assert_close(out[row : row + 1], want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row : row + 1], want_l, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 64, 16), (4, 4, 32, 4), (8, 2, 128, 16), (16, 2, 128, 16), (6, 2, 24, 8)]
)
def test_c_decode_kernel_matches_sdpa_over_the_pages(dtype, heads, kv_heads, head_dim, block_size):
    """cpu_decode's kernel (head and group sizes 64 x 3, 64 x 4 in bf16 and float32, 128 x 4, 128 x 8 in bf16 as constants, any
    other generic) reads the shuffled pages in place: ragged lengths, one partial block, many
    blocks, GQA and MHA."""
    specs = [(0, 1), (block_size - 1, 1), (block_size, 1), (5 * block_size + 3, 1), (200, 1)]
    q, kc, vc, meta, dense, queries = _paged_case(
        specs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size
    )
    kc, vc = kc.to(dtype), vc.to(dtype)
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, head_dim**-0.5)
    assert meta.host_plans["torch"].native
    for row, ((ctx, _), (k, v), qs) in enumerate(zip(specs, dense, queries)):
        want_o, want_l = _sdpa_oracle(qs, k.to(dtype).float(), v.to(dtype).float(), ctx, head_dim**-0.5)
        torch.testing.assert_close(out[row : row + 1], want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row : row + 1], want_l, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("threads", [2, 5])
@pytest.mark.parametrize("specs", [[(700, 1)], [(1000, 1), (515, 1)], [(600, 1), (3, 1)]])
def test_c_decode_kernel_splits_long_sequences_over_idle_threads(threads, specs):
    """Fewer sequences than threads, one long: its blocks go to several threads in ranges
    (a short sequence's fewer blocks than ranges too) and the partials merge to the oracle."""
    q, kc, vc, meta, dense, queries = _paged_case(specs, num_heads=6, num_kv_heads=2, head_dim=64, block_size=16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = TorchReferenceBackend().forward(q, kc.bfloat16(), vc.bfloat16(), meta, 0.125)
    finally:
        torch.set_num_threads(before)
    assert meta.host_plans["torch"].native
    for row, ((ctx, _), (k, v), qs) in enumerate(zip(specs, dense, queries)):
        want_o, want_l = _sdpa_oracle(qs, k.bfloat16().float(), v.bfloat16().float(), ctx, 0.125)
        torch.testing.assert_close(out[row : row + 1], want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row : row + 1], want_l, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 128, 16), (6, 2, 24, 8)])
def test_c_decode_kernel_over_an_int8_cache(threads, heads, kv_heads, head_dim, block_size):
    """An int8 cache (kv_quant's per-token rows) through the C kernel (64 x 3 as constants,
    others generic; long sequences split over threads) equals the oracle over its dequantized
    values, and differs from the float cache it was made from."""
    from fapool.attention.kv_quant import KVScales, dequantize_int8_cache, quantize_int8_cache

    specs = [(0, 1), (block_size - 1, 1), (5 * block_size + 3, 1), (700, 1)]
    q, kc, vc, meta, _, _ = _paged_case(
        specs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, seed=5
    )
    (k8, ks), (v8, vs) = quantize_int8_cache(kc), quantize_int8_cache(vc)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = TorchReferenceBackend().forward(q, k8, v8, meta, head_dim**-0.5, KVScales(k_pages=ks, v_pages=vs))
    finally:
        torch.set_num_threads(before)
    assert meta.host_plans["torch"].native
    deq = dequantize_int8_cache(k8, ks), dequantize_int8_cache(v8, vs)
    want = TorchReferenceBackend().forward(q, *deq, meta, head_dim**-0.5)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-5)
    exact, _ = TorchReferenceBackend().forward(q, kc, vc, meta, head_dim**-0.5)
    assert 1e-4 < float((out - exact).norm() / exact.norm()) < 2e-2


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 24, 4), (8, 2, 128, 8)])
def test_c_prefill_kernel_matches_sdpa_over_the_pages(dtype, heads, kv_heads, head_dim, block_size):
    """Prefill chunks of a bf16 cache through cpu_decode's C kernel: whole prompts (causal), chunks over a
    cached prefix, query tiles of 16 and a ragged last tile, partial blocks, decode rows in the
    same batch; every row against the oracle. A bf16 cache takes bf16 dot products, q and P
    rounded to bf16 (as aten's flash kernel rounds them): the oracle gets q so rounded, and the
    output may differ by P's rounding (2^-8 of the values, which lie within +-4 here)."""
    specs = [(0, 37), (21, 16), (0, 2), (5, 1), (block_size * 3, 19), (200, 1)]
    q, kc, vc, meta, dense, queries = _paged_case(
        specs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, seed=3
    )
    kc, vc = kc.to(dtype), vc.to(dtype)
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, head_dim**-0.5)
    # A float32 cache keeps aten's float32 flash kernel for its chunks (HF parity).
    assert meta.host_plans["torch"].native_multi == (dtype == torch.bfloat16)
    starts = meta.query_start_loc.tolist()
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (4 * 2**-8, 2**-8)
    for s, ((ctx, ql), (k, v), qs) in enumerate(zip(specs, dense, queries)):
        qs = qs * head_dim**-0.5  # the kernels take q already scaled
        if ql > 1:  # decode rows (ql 1) keep float32 q in the decode kernel
            qs = qs.to(dtype).float()
        want_o, want_l = _sdpa_oracle(qs, k.to(dtype).float(), v.to(dtype).float(), ctx, 1.0)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], want_o, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse[starts[s] : starts[s + 1]], want_l, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 24, 4), (8, 2, 128, 8)])
def test_c_prefill_kernel_over_an_int8_cache(heads, kv_heads, head_dim, block_size):
    """Prefill chunks over an int8 cache through the C kernel (its rows widened to bf16, each
    key's scales on its score and probability): the oracle over the dequantized values with q
    rounded to bf16, within P's bf16 rounding, as the bf16 cache's test; decode rows in the
    same batch through the C decode."""
    from fapool.attention.kv_quant import KVScales, dequantize_int8_cache, quantize_int8_cache

    specs = [(0, 37), (21, 16), (0, 2), (5, 1), (block_size * 3, 19), (200, 1)]
    q, kc, vc, meta, _, queries = _paged_case(
        specs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, seed=7
    )
    (k8, ks), (v8, vs) = quantize_int8_cache(kc), quantize_int8_cache(vc)
    out, lse = TorchReferenceBackend().forward(q, k8, v8, meta, head_dim**-0.5, KVScales(k_pages=ks, v_pages=vs))
    assert meta.host_plans["torch"].native_multi and meta.host_plans["torch"].native
    deq_k, deq_v = dequantize_int8_cache(k8, ks), dequantize_int8_cache(v8, vs)
    tables, starts = meta.block_tables.tolist(), meta.query_start_loc.tolist()
    for s, ((ctx, ql), qs) in enumerate(zip(specs, queries)):
        n = ctx + ql
        pos = torch.arange(n)
        slots = torch.tensor(tables[s])[pos // block_size] * block_size + pos % block_size
        k = deq_k.view(-1, kv_heads, head_dim)[slots]
        v = deq_v.view(-1, kv_heads, head_dim)[slots]
        qs = qs * head_dim**-0.5
        if ql > 1:
            qs = qs.bfloat16().float()
        want_o, want_l = _sdpa_oracle(qs, k, v, ctx, 1.0)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], want_o, atol=4 * 2**-8, rtol=2**-8)
        torch.testing.assert_close(lse[starts[s] : starts[s + 1]], want_l, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_kv_write_equals_the_torch_write(dtype):
    """The backend's KV write through cpu_decode's one C call: rows straight from a strided
    projection output (value a view of it, as the model hands them over), slot -1 skipped;
    the same caches as write_kv_torch's."""
    torch.manual_seed(0)
    qkv = torch.randn(5, 3 * 2 * 8).to(dtype)
    key, value = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    slots = torch.tensor([7, -1, 0, 12, 3])
    got = [torch.zeros(4, 4, 2, 8, dtype=dtype) for _ in range(2)]
    want = [torch.zeros(4, 4, 2, 8, dtype=dtype) for _ in range(2)]
    assert cpu_decode.write_kv(cpu_decode.load(), *got, key, value, slots)
    TorchReferenceBackend().write_kv(*got, key, value, slots)  # again, through the backend: same rows
    write_kv_torch(*want, key, value, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[0].abs().sum() > 0
    if dtype == torch.bfloat16:  # rows in another dtype than the cache's: left to write_kv_torch
        assert not cpu_decode.write_kv(cpu_decode.load(), *got, key.float(), value, slots)


def test_c_decode_kernel_refuses_what_it_was_not_built_for():
    """supports() keeps FP8 and oversized layouts on the aten paths."""
    assert cpu_decode.supports(torch.zeros(2, 16, 3, 64, dtype=torch.bfloat16), 3)
    assert cpu_decode.supports(torch.zeros(2, 16, 3, 64, dtype=torch.int8), 3)
    assert not cpu_decode.supports(torch.zeros(2, 16, 3, 64, dtype=torch.float8_e4m3fn), 3)
    assert not cpu_decode.supports(torch.zeros(2, 16, 1, 512), 1)  # head size
    assert not cpu_decode.supports(torch.zeros(2, 16, 1, 63), 1)  # odd head size
    assert not cpu_decode.supports(torch.zeros(2, 32, 1, 64), 1)  # block size: one vector of scores
    assert not cpu_decode.supports(torch.zeros(2, 16, 1, 64), 17)  # query heads per KV head


def _math_cudnn_attention(q, k, v, bias, compute_lse, dropout_p, is_causal, debug_mask, scale=None):
    """torch's cuDNN attention op computed in float32 on any device: top-left causal mask, LSE
    [B, H, Q, 1]; fewer KV heads than query heads are shared (cuDNN's GQA)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    s = q.float() @ k.transpose(-1, -2) * scale
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype), s.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("with_new_kv", [False, True], ids=["gathered", "new_kv"])
def test_cudnn_prefill_glue_matches_the_reference(monkeypatch, native_gqa, with_new_kv):
    """cudnn_prefill's gather, prefix/chunk split and LSE merge, with cuDNN's op replaced by the
    same math: chunks over a prefix on and off a page boundary, a fresh prompt, and rows of
    sequences it does not take left as they were; the chunks' own K/V gathered from the pages
    or read from the step's new rows."""
    from fapool.attention import cudnn_prefill

    monkeypatch.setattr(cudnn_prefill, "_cudnn_sdpa", _math_cudnn_attention)
    monkeypatch.setattr(cudnn_prefill, "_native_gqa", lambda device, dtype: native_gqa)
    specs = [(0, 9), (13, 6), (8, 8), (5, 1), (3, 2)]
    q, kc, vc, meta, dense, _ = _paged_case(specs, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    seqs = cudnn_prefill.plan(meta, 6)
    assert seqs == [0, 1, 2]
    out = torch.full_like(q, 7.0)
    lse = torch.full(q.shape[:2], 7.0)
    ref_out, ref_lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.3)
    new_kv = None
    if with_new_kv:  # the new rows in query order; their copies in the pages poisoned: unread
        new_kv = tuple(torch.cat([t[ctx:] for (ctx, _), t in zip(specs, side)]) for side in zip(*dense))
        slots = meta.slot_mapping[: sum(n for _, n in specs[:3])]
        for cache in (kc, vc):
            cache.view(-1, *cache.shape[2:])[slots] = 1e4
    cudnn_prefill.prefill(q, kc, vc, meta, 0.3, seqs, out, lse, new_kv)
    taken = sum(n for _, n in specs[:3])
    torch.testing.assert_close(out[:taken], ref_out[:taken], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:taken], ref_lse[:taken], atol=1e-5, rtol=1e-5)
    assert (out[taken:] == 7.0).all() and (lse[taken:] == 7.0).all()
