"""Triton kernels (paged decode, paged prefill, KV write) against the torch reference backend.

Runs on a CUDA GPU; elsewhere the kernel tests skip. `TRITON_INTERPRET=1` runs them through
Triton's interpreter on CPU tensors (slow, for kernel debugging without a GPU).
"""

import math

import pytest
import torch
from gpu_marks import INTERPRET
from gpu_marks import needs_triton as needs_gpu
from paged_cases import shard_metadata

from fapool.attention import AttentionMetadata, TorchReferenceBackend, merge_partials
from fapool.attention.torch_ref import write_kv_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter computes through numpy, which has no bfloat16: it stands in with float16.
BF16 = torch.float16 if INTERPRET and not torch.cuda.is_available() else torch.bfloat16
DTYPES = sorted({BF16, torch.float16}, key=str)
# Kernel tolerances per dtype: bf16 keeps 8 mantissa bits, fp16 11 (P is rounded to it for P@V).
TOL = {torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}
POISON = 100.0  # fills the slots no sequence owns: reading one by mistake swamps the result


def _paged_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """specs: list of (context_len, query_len). A shuffled paged cache that holds each sequence's
    context plus its new tokens, the queries, and metadata with kv_start = 0."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil((c + q) / block_size) for c, q in specs) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), POISON)
    v_cache = torch.full_like(k_cache, POISON)
    tables, slots, queries = [], [], []
    for ctx, ql in specs:
        n = ctx + ql
        table = [perm.pop() for _ in range(math.ceil(n / block_size))]
        pos = torch.arange(n)
        flat = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v_cache.view(-1, num_kv_heads, head_dim)[flat] = torch.randn(n, num_kv_heads, head_dim, generator=g)
        tables.append(table)
        slots += flat[ctx:].tolist()
        queries.append(torch.randn(ql, num_heads, head_dim, generator=g))
    meta = AttentionMetadata.build(
        query_lens=[q for _, q in specs],
        query_pos_start=[c for c, _ in specs],
        kv_lens=[c + q for c, q in specs],
        block_tables=tables,
        slot_mapping=slots,
        device=DEVICE,
    )
    to = dict(device=DEVICE, dtype=dtype)
    return torch.cat(queries).to(**to), k_cache.to(**to), v_cache.to(**to), meta


def _assert_matches_reference(out, lse, q, kc, vc, meta, scale, dtype):
    ref_out, ref_lse = TorchReferenceBackend().forward(q, kc, vc, meta, scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    rel = (out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp_min(1e-12)
    assert rel < 1e-2, f"relative error {rel:.2e}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-3)


def _boundary_lengths(block_size):
    """Odd lengths and lengths on and around page and tile boundaries."""
    return sorted(
        {
            1,
            2,
            7,
            block_size - 1,
            block_size,
            block_size + 1,
            2 * block_size,
            63,
            64,
            65,
            3 * block_size + 5,
            127,
            129,
            257,
            1000,
        }
    )


HEADS = [(8, 2, 128), (4, 4, 128), (32, 8, 128), (8, 1, 64)]  # (num_heads, num_kv_heads, head_dim)


def test_backend_imports_without_triton():
    from fapool.attention.triton_backend import TritonBackend, triton_available

    assert TritonBackend.name == "triton"
    assert isinstance(triton_available(), bool)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_decode_matches_reference(dtype, block_size, heads):
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = heads
    specs = [(n - 1, 1) for n in _boundary_lengths(block_size)]
    q, kc, vc, meta = _paged_case(
        specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=block_size
    )
    scale = head_dim**-0.5
    out, lse = TritonBackend().forward(q, kc, vc, meta, scale)
    _assert_matches_reference(out, lse, q, kc, vc, meta, scale, dtype)


@needs_gpu
@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 16, 200])
def test_decode_forced_split_counts(num_splits, num_stages):
    """One split (direct write), uneven splits, and more splits than tiles (empty splits)."""
    from fapool.attention.triton_decode import paged_decode

    dtype = BF16
    specs = [(0, 1), (16, 1), (999, 1), (4100, 1), (63, 1)]
    q, kc, vc, meta = _paged_case(specs, 32, 8, 128, 16, dtype, seed=num_splits)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    paged_decode(q, kc, vc, meta, 0.1, out, lse, num_splits=num_splits, num_stages=num_stages)
    _assert_matches_reference(out, lse, q, kc, vc, meta, 0.1, dtype)


@needs_gpu
def test_decode_unsplit_one_wave():
    """From ~1.5 (sequence, KV head) pairs per SM to one wave of 3-stage programs, the default
    launch runs one unsplit 3-stage program per pair; it still matches the reference."""
    from fapool.attention import triton_decode as td
    from fapool.attention.triton_backend import TritonBackend

    # 132 SMs (H100 / H200), head dim 128: 3 programs an SM at 3 stages, so 198..396 pairs.
    assert [td.unsplit_one_wave(p, 128, 132) for p in (128, 197, 198, 256, 396, 397, 512)] == [
        False, False, True, True, True, False, False
    ]
    cpu = torch.device("cpu")  # counted as 132 SMs
    assert td.auto_num_splits(32, 8, 2048, 128, 2, cpu) == 1  # 256 pairs
    assert td.auto_num_splits(16, 8, 2048, 128, 2, cpu) > 1  # 128 pairs: split
    fp8_capacity = td.resident_programs_per_sm(td.FP8_BLOCK_N, 128, td.FP8_NUM_STAGES, td.FP8_NUM_WARPS, 1) * 132
    fp8_model = td.choose_num_splits(256, 2048 // td.FP8_BLOCK_N, fp8_capacity)
    assert td.auto_num_splits(32, 8, 2048, 128, 1, cpu) == fp8_model  # an FP8 cache: its own model
    # From FP8_WARP_SPLIT_MIN_KV keys an FP8 cache takes the warp-split kernel and its model.
    assert [td.fp8_warp_split(n) for n in (2048, 8191, 8192, 32768)] == [False, False, True, True]
    ws_config = (td.FP8_WS_BLOCK_N, 128, td.FP8_WS_NUM_STAGES, td.FP8_WS_NUM_WARPS, 1, True)
    ws_model = td.choose_num_splits(128, 32768 // td.FP8_WS_BLOCK_N, td.resident_programs_per_sm(*ws_config) * 132)
    assert td.auto_num_splits(16, 8, 32768, 128, 1, cpu) == ws_model
    # An int8 cache's scales cost registers (234 a thread, measured): 4 warp-split programs an SM, not 6.
    assert td.resident_programs_per_sm(*ws_config) == 6
    assert td.resident_programs_per_sm(*ws_config, int8=True) == 4
    int8_model = td.choose_num_splits(128, 32768 // td.FP8_WS_BLOCK_N, 4 * 132)
    assert td.auto_num_splits(16, 8, 32768, 128, 1, cpu, int8=True) == int8_model
    specs = [(50 + 61 * i, 1) for i in range(32)]  # 32 sequences x 8 KV heads = 256 pairs
    q, kc, vc, meta = _paged_case(specs, 32, 8, 128, 16, BF16, seed=11)
    out, lse = TritonBackend().forward(q, kc, vc, meta, 0.1)
    _assert_matches_reference(out, lse, q, kc, vc, meta, 0.1, BF16)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads", HEADS[:3], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_mixed_batch_matches_reference(dtype, block_size, heads):
    """Fresh prompts, prefix-cached chunks, decode tokens in one batch; odd and boundary sizes."""
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = heads
    bs = block_size
    specs = [
        (0, 7),
        (0, 129),
        (37, 64),
        (bs, bs),
        (200, 301),
        (15, 1),
        (0, 1),
        (bs - 1, bs + 1),
        (1000, 17),
        (2 * bs, 1),
    ]
    q, kc, vc, meta = _paged_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=7 + bs)
    scale = head_dim**-0.5
    out, lse = TritonBackend().forward(q, kc, vc, meta, scale)
    _assert_matches_reference(out, lse, q, kc, vc, meta, scale, dtype)


@needs_gpu
@pytest.mark.parametrize("block_m", [64, 128])
def test_prefill_long_prompt_and_prefix(block_m):
    """A long prompt (many causal tiles), and a chunk over a long cached prefix; every row written."""
    from fapool.attention.triton_prefill import paged_prefill

    dtype = BF16
    specs = [(0, 1500), (3000, 333), (5, 2)]
    q, kc, vc, meta = _paged_case(specs, 16, 4, 128, 16, dtype, seed=block_m)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    paged_prefill(q, kc, vc, meta, 0.09, out, lse, block_m=block_m)
    _assert_matches_reference(out, lse, q, kc, vc, meta, 0.09, dtype)


def test_cudnn_takes_long_chunks_over_their_whole_kv_only():
    """The host plan: cuDNN gets a long fresh prompt, a long chunk over a cached prefix and a shard
    holding a chunk with part of its prefix (kv_start > 0); a short chunk, a decode token and a
    shard that ends before its chunk does stay with the Triton kernels."""
    from fapool.attention import cudnn_prefill

    meta = AttentionMetadata.build(
        query_lens=[1024, 2000, 1023, 1, 1500, 1500],
        query_pos_start=[0, 3000, 0, 9000, 4096, 0],
        kv_lens=[1024, 5000, 1023, 9001, 1500 + 2048, 1024],
        block_tables=[[0]] * 6,
        slot_mapping=[-1] * (1024 + 2000 + 1023 + 1 + 1500 + 1500),
        kv_start=[0, 0, 0, 0, 2048, 0],
    )
    assert cudnn_prefill.plan(meta, 1024) == [0, 1, 4]
    assert cudnn_prefill.plan(meta, 2001) == []
    # Enough causal pairs: the chunk over 3,000 cached tokens and the shard over 2,048 only.
    assert cudnn_prefill.plan(meta, 1024, min_pairs=4_000_000) == [1, 4]
    assert cudnn_prefill.plan(meta.without_kv([1]), 1024) == [0, 4]


@needs_gpu
@pytest.mark.parametrize("min_query_len", [64, 1024])
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 16, 64)], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_cudnn_prefill_in_a_mixed_batch_matches_reference(min_query_len, heads):
    """Long chunks (fresh, and over a cached prefix off a page boundary) through cuDNN beside
    short chunks and decode tokens through the Triton kernels: every row matches the reference."""
    from fapool.attention import cudnn_prefill
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = heads
    specs = [(0, 1500), (3001, 1100), (37, 64), (5, 2), (40, 1), (0, 77), (16, 16)]
    q, kc, vc, meta = _paged_case(specs, num_heads, num_kv_heads, head_dim, 16, BF16, seed=min_query_len)
    assert cudnn_prefill.usable(q, kc), "torch's CUDA builds ship cuDNN 9: the path must be live here"
    taken = cudnn_prefill.plan(meta, min_query_len)
    assert taken == [s for s, (_, n) in enumerate(specs) if n >= min_query_len]
    backend = TritonBackend(cudnn_min_query_len=min_query_len, cudnn_min_pairs=0)
    out, lse = backend.forward(q, kc, vc, meta, 0.1)
    _assert_matches_reference(out, lse, q, kc, vc, meta, 0.1, BF16)
    # The step's new K/V rows passed along (as the model does); their page copies poisoned.
    new_kv, poisoned = _new_rows_and_poisoned_pages(kc, vc, meta)
    out, lse = backend.forward(q, *poisoned, meta, 0.1, new_kv=new_kv)
    taken_rows = torch.cat(
        [torch.arange(meta.query_start_loc[s], meta.query_start_loc[s + 1]) for s in taken]
    )
    ref_out, ref_lse = backend.forward(q, kc, vc, meta, 0.1)
    torch.testing.assert_close(out[taken_rows].float(), ref_out[taken_rows].float(), **TOL[BF16])
    torch.testing.assert_close(lse[taken_rows], ref_lse[taken_rows], atol=1e-3, rtol=1e-3)


def _new_rows_and_poisoned_pages(kc, vc, meta):
    """(this step's K/V rows in query order, copies of the caches with those slots poisoned)."""
    slots = meta.slot_mapping.long()
    new_kv = tuple(c.view(-1, *c.shape[2:])[slots].clone() for c in (kc, vc))
    poisoned = tuple(c.clone() for c in (kc, vc))
    for c in poisoned:
        c.view(-1, *c.shape[2:])[slots] = POISON
    return new_kv, poisoned


@needs_gpu
def test_cudnn_fresh_prompt_alone_reads_the_new_rows():
    """A batch of one fresh long prompt: cuDNN on the new K/V, its output handed back as is."""
    from fapool.attention.triton_backend import TritonBackend

    q, kc, vc, meta = _paged_case([(0, 2048)], 32, 8, 128, 16, BF16, seed=3)
    new_kv, poisoned = _new_rows_and_poisoned_pages(kc, vc, meta)
    out, lse = TritonBackend(cudnn_min_query_len=512, cudnn_min_pairs=0).forward(
        q, *poisoned, meta, 0.1, new_kv=new_kv
    )
    _assert_matches_reference(out, lse, q, kc, vc, meta, 0.1, BF16)


@needs_gpu
@pytest.mark.parametrize("heads,head_dim", [(32, 128), (9, 64), (4, 96)])
def test_merge_two_into_matches_merge_partials(heads, head_dim):
    """The fused two-way merge against merge_partials, into strided destination rows, with rows
    one side (or neither side) saw nothing of and lses in a transposed layout (cuDNN's)."""
    from fapool.attention.triton_merge import merge_two_into

    T = 300
    g = torch.Generator(device=DEVICE).manual_seed(heads)
    oa, ob = (torch.randn(T, heads, head_dim, device=DEVICE, generator=g).to(BF16) for _ in range(2))
    la = (torch.randn(heads, T, device=DEVICE, generator=g) * 3).t()  # [T, H] with strides (1, T)
    lb = torch.randn(T, heads, device=DEVICE, generator=g) * 3
    la[:10] = float("-inf")
    lb[5:15] = float("-inf")  # rows 5-9: neither side
    oa[:10] = 0
    ob[5:15] = 0
    ref_o, ref_l = merge_partials([oa, ob], [la, lb])
    out = torch.full((T + 20, heads, head_dim), float("nan"), device=DEVICE, dtype=BF16)
    lse = torch.full((T + 20, heads), float("nan"), device=DEVICE)
    merge_two_into(oa, la, ob, lb, out[10 : 10 + T], lse[10 : 10 + T])
    torch.testing.assert_close(out[10 : 10 + T].float(), ref_o.float(), **TOL[BF16])
    torch.testing.assert_close(lse[10 : 10 + T], ref_l, atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[:10]).all() and torch.isnan(lse[T + 10 :]).all()


@needs_gpu
@pytest.mark.parametrize("cudnn_min_query_len", [None, 48])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_with_kv_start_merge_to_the_whole(block_size, num_shards, cudnn_min_query_len):
    """The attention pool's placement: each sequence's pages split into contiguous position ranges
    (kv_start > 0), some of which a chunk's early queries cannot see. Each shard matches the
    reference, and the LSE merge of the shards matches attention over the whole KV; with the
    Triton kernel alone and with cuDNN taking the chunks of 48 tokens or more where it can."""
    from fapool.attention.triton_backend import TritonBackend

    dtype = BF16
    specs = [(21, 1), (9, 6), (700, 1), (300, 90), (0, 50)]
    q, kc, vc, meta = _paged_case(specs, 8, 2, 128, block_size, dtype, seed=num_shards)
    backend = TritonBackend(cudnn_min_query_len=cudnn_min_query_len, cudnn_min_pairs=0)
    whole_out, whole_lse = backend.forward(q, kc, vc, meta, 0.1)
    _assert_matches_reference(whole_out, whole_lse, q, kc, vc, meta, 0.1, dtype)
    tables = meta.block_tables.tolist()
    outs, lses = [], []
    for shard in range(num_shards):
        sub = shard_metadata(specs, tables, meta.slot_mapping.tolist(), block_size, num_shards, shard, DEVICE)
        o, lse = backend.forward(q, kc, vc, sub, 0.1)
        _assert_matches_reference(o, lse, q, kc, vc, sub, 0.1, dtype)
        outs.append(o)
        lses.append(lse)
    assert any(torch.isneginf(x).any() for x in lses), "some shard should be invisible to some query"
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(out.float(), whole_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse, whole_lse, atol=2e-3, rtol=1e-3)


@needs_gpu
def test_empty_kv_gives_zero_and_minus_inf():
    from fapool.attention.triton_backend import TritonBackend

    q, kc, vc, _ = _paged_case([(40, 1), (40, 5)], 8, 2, 128, 16, BF16)
    empty = AttentionMetadata.build([1, 5], [40, 40], [0, 0], [[], []], [-1] * 6, device=DEVICE)
    out, lse = TritonBackend().forward(q, kc, vc, empty, 0.1)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_write_kv_matches_torch(dtype, block_size):
    from fapool.attention.triton_backend import TritonBackend

    g = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 9, 8, 128, 37
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::5] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    caches = [
        torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        for _ in range(2)
    ]
    expect = [c.clone() for c in caches]
    slots = slots.to(DEVICE)
    TritonBackend().write_kv(caches[0], caches[1], key, value, slots)
    write_kv_torch(expect[0], expect[1], key, value, slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


@needs_gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", HEADS[1:3], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_fp8_cache_matches_reference_over_its_values(block_size, heads):
    """Decode, prefill and prefix-cached chunks over an e4m3 cache with per-tensor scales equal
    the reference over the dequantized values (the kernels widen in registers, fold the scales)."""
    from fapool.attention.kv_quant import FP8_DTYPE, KVScales, quantize
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = heads
    mixed = [(0, 7), (0, 129), (37, 64), (200, 301), (15, 1), (1000, 1), (block_size - 1, 1)]
    decode = [(n, 1) for n in (0, 15, 1000, 9000, block_size - 1)]  # 9000: the warp-split kernel
    scales = KVScales(k=0.011, v=0.007)
    scale = head_dim**-0.5
    for specs in (mixed, decode):
        q, kc, vc, meta = _paged_case(
            specs, num_heads, num_kv_heads, head_dim, block_size, BF16, seed=block_size
        )
        k8, v8 = quantize(kc, scales.k, FP8_DTYPE), quantize(vc, scales.v, FP8_DTYPE)
        out, lse = TritonBackend().forward(q, k8, v8, meta, scale, scales)
        _assert_matches_reference(
            out, lse, q, k8.float() * scales.k, v8.float() * scales.v, meta, scale, BF16
        )


def _int8_cache(kc, vc):
    """(k8, v8, their KVScales, dequantized K, dequantized V) of float caches, one scale a row."""
    from fapool.attention.kv_quant import KVScales, dequantize_int8_cache, quantize_int8_cache

    (k8, ks), (v8, vs) = quantize_int8_cache(kc), quantize_int8_cache(vc)
    return k8, v8, KVScales(k_pages=ks, v_pages=vs), dequantize_int8_cache(k8, ks), dequantize_int8_cache(v8, vs)


@needs_gpu
@pytest.mark.parametrize("tiles", [(32, 2, 4), (64, 4, 3), (128, 8, 2), (64, 2, 2)], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3, 200])
@pytest.mark.parametrize("heads", [(8, 1, 64), (32, 8, 128)], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
@pytest.mark.parametrize("cache", ["fp8", "int8"])
def test_8bit_decode_warp_slices_and_splits(tiles, num_splits, heads, cache):
    """The warp-split kernel's warps each take block_n // num_warps tokens of a tile: tiles of 2
    to 8 warps, one split, uneven splits and empty ones, past page and tile boundaries, equal
    the reference over the dequantized values, over an FP8 and an int8 cache."""
    from fapool.attention.kv_quant import FP8_DTYPE, quantize
    from fapool.attention.triton_decode import paged_decode

    block_n, num_warps, num_stages = tiles
    num_heads, num_kv_heads, head_dim = heads
    specs = [(0, 1), (16, 1), (block_n - 1, 1), (block_n + 16, 1), (999, 1), (4100, 1)]
    q, kc, vc, meta = _paged_case(specs, num_heads, num_kv_heads, head_dim, 16, BF16, seed=num_splits)
    if cache == "fp8":
        k8, v8 = quantize(kc, 0.013, FP8_DTYPE), quantize(vc, 0.009, FP8_DTYPE)
        kw, deq_k, deq_v = {"k_scale": 0.013, "v_scale": 0.009}, k8.float() * 0.013, v8.float() * 0.009
    else:
        k8, v8, scales, deq_k, deq_v = _int8_cache(kc, vc)
        kw = {"k_pages": scales.k_pages, "v_pages": scales.v_pages}
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    paged_decode(q, k8, v8, meta, 0.1, out, lse, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                 num_stages=num_stages, warp_split=True, **kw)
    _assert_matches_reference(out, lse, q, deq_k, deq_v, meta, 0.1, BF16)


@needs_gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", [HEADS[2], HEADS[3]], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_int8_cache_matches_reference_over_its_values(block_size, heads):
    """Decode (both kernels), prefill and prefix-cached chunks over an int8 cache with a scale a
    token and KV head equal the reference over the dequantized values."""
    from fapool.attention.triton_backend import TritonBackend

    num_heads, num_kv_heads, head_dim = heads
    mixed = [(0, 7), (0, 129), (37, 64), (200, 301), (15, 1), (1000, 1), (block_size - 1, 1)]
    decode = [(n, 1) for n in (0, 15, 1000, 9000, block_size - 1)]  # 9000: the warp-split kernel
    scale = head_dim**-0.5
    for specs in (mixed, decode):
        q, kc, vc, meta = _paged_case(specs, num_heads, num_kv_heads, head_dim, block_size, BF16, seed=block_size)
        k8, v8, scales, deq_k, deq_v = _int8_cache(kc, vc)
        out, lse = TritonBackend().forward(q, k8, v8, meta, scale, scales)
        _assert_matches_reference(out, lse, q, deq_k, deq_v, meta, scale, BF16)
    with pytest.raises(ValueError, match="k_pages"):
        TritonBackend().forward(q, k8, v8, meta, scale)


def _write_inputs(block_size: int):
    """(slots with every fifth -1, key, value) for the 8-bit KV write tests: 37 tokens, 8 KV heads
    of 128 over 9 blocks."""
    g = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 9, 8, 128, 37
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens].to(DEVICE)
    slots[::5] = -1
    key = (4 * torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)).to(DEVICE, BF16)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE, BF16)
    return slots, key, value


@needs_gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "k_shift"])
def test_write_kv_int8_matches_torch(block_size, shifted):
    """The Triton write's int8 rows and scales are the torch reference's (a rounding tie may land
    one step apart where the GPU fuses the multiply-add), with and without K's channel shift."""
    from fapool.attention.kv_quant import KVScales

    num_blocks, num_kv_heads, head_dim = 9, 8, 128
    slots, key, value = _write_inputs(block_size)
    shift = None
    if shifted:
        key[:, :, 5] += 30.0  # an offset channel, which the shift takes out
        shift = key.float().mean(0).to(BF16).float().contiguous()  # bf16 values: a row can equal it
    key[1, 2] = 0 if shift is None else shift[2]  # a row that is all zero once shifted: scale 0
    value[3, 0, :] = 1e-6  # a tiny row still spans the int8 range

    def caches():
        kv = [torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.int8, device=DEVICE)
              for _ in "kv"]
        pages = [torch.zeros(num_blocks, num_kv_heads, block_size, device=DEVICE) for _ in "kv"]
        return kv, KVScales(k_pages=pages[0], v_pages=pages[1], k_shift=shift)

    (kc, vc), got = caches()
    (ek, ev), want = caches()
    from fapool.attention.triton_backend import TritonBackend

    TritonBackend().write_kv(kc, vc, key, value, slots, got)
    write_kv_torch(ek, ev, key, value, slots, want)
    for a, b in ((kc, ek), (vc, ev)):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    torch.testing.assert_close(got.k_pages, want.k_pages, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.v_pages, want.v_pages, rtol=1e-6, atol=0)
    kept = slots[slots >= 0]
    assert (got.k_pages.transpose(1, 2).reshape(-1, num_kv_heads)[kept] > 0).sum() == kept.numel() * num_kv_heads - 1
    assert vc.view(-1, num_kv_heads, head_dim)[slots[3], 0].abs().max() == 127  # the tiny row (slot kept)


@needs_gpu
def test_fp8_decode_refuses_slices_under_16_tokens():
    from fapool.attention.kv_quant import FP8_DTYPE
    from fapool.attention.triton_decode import paged_decode

    q, kc, vc, meta = _paged_case([(40, 1)], 8, 2, 128, 16, BF16)
    with pytest.raises(ValueError, match="multiple of 16"):
        paged_decode(q, kc.to(FP8_DTYPE), vc.to(FP8_DTYPE), meta, 0.1, block_n=32, num_warps=4, warp_split=True)


@needs_gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "k_shift"])
def test_write_kv_fp8_matches_torch(block_size, shifted):
    from fapool.attention.kv_quant import FP8_DTYPE, KVScales
    from fapool.attention.triton_backend import TritonBackend

    num_blocks, num_kv_heads, head_dim = 9, 8, 128
    slots, key, value = _write_inputs(block_size)
    key[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 1e-6])  # saturated both ways, zero, tiny
    shift = (torch.arange(num_kv_heads * head_dim, device=DEVICE).view(num_kv_heads, head_dim) % 7 - 3.0) if shifted else None
    scales = KVScales(k=0.05, v=0.01, k_shift=shift)
    caches = [
        torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=FP8_DTYPE, device=DEVICE)
        for _ in "kv"
    ]
    expect = [c.clone() for c in caches]
    TritonBackend().write_kv(caches[0], caches[1], key, value, slots, scales)
    write_kv_torch(expect[0], expect[1], key, value, slots, scales)
    for got, want in zip(caches, expect):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
