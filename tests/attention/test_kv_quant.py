"""8-bit KV caches on the CPU: the quantizers, the torch reference reading an FP8 or int8 cache,
the FP8 per-layer scale calibration, and the engine with `kv_cache_dtype="fp8"` / `"int8"`."""

import pytest
import torch
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.attention import AttentionMetadata, TorchReferenceBackend
from fapool.attention.kv_quant import (
    FP8_DTYPE,
    FP8_MAX,
    HEADROOM,
    KVScales,
    calibrate_kv_scales,
    dequantize_int8_cache,
    quantize,
    quantize_int8_rows,
    scale_pages,
)
from fapool.attention.torch_ref import write_kv_torch
from fapool.config import ConfigError


def test_quantize_saturates_and_rounds_to_e4m3():
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.3, -2.5])
    q = quantize(x, 0.5, FP8_DTYPE)
    assert q.dtype == FP8_DTYPE
    back = q.float() * 0.5
    assert back[0] == FP8_MAX * 0.5 and back[1] == -FP8_MAX * 0.5  # saturated, not inf or NaN
    # e4m3 keeps 3 mantissa bits: round to nearest is within 1/16 of a normal value.
    assert torch.all((back[2:] - x[2:]).abs() <= x[2:].abs() / 16)
    assert quantize(x, 0.5, torch.bfloat16).dtype == torch.bfloat16  # non-FP8 caches: a plain cast


def test_int8_rows_keep_each_rows_range():
    x = torch.tensor([[[127.0, -63.5, 0.2, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[1e-3, -2e-3, 5e-4, 0.0]]])
    q, s = quantize_int8_rows(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q[0, 0].tolist() == [127, -63, 0, 0]  # half up: -63.5 -> -63
    assert s[1, 0] == 0 and not q[1].any()  # a zero row: scale 0, no NaN
    assert q[2, 0, 1] == -127  # a tiny row uses the whole range
    assert torch.all((q.float() * s[..., None] - x).abs() <= s[..., None] / 2 + 1e-12)


def _write_case(dtype, scales, seed=0):
    """Two sequences (a prompt chunk over a cached prefix, and a decode token) written through
    write_kv_torch into a cache of `dtype` (int8: with scale pages in `scales`, made here when
    None)."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, bs, blocks = 4, 2, 16, 4, 12
    k_cache = torch.zeros(blocks, bs, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    if dtype == torch.int8 and scales is None:
        scales = KVScales(k_pages=torch.zeros(blocks, kv_heads, bs), v_pages=torch.zeros(blocks, kv_heads, bs))
    n = 9 + 6
    key = 3 * torch.randn(n, kv_heads, dim, generator=g)
    value = torch.randn(n, kv_heads, dim, generator=g)
    slots = torch.tensor(list(range(9)) + list(range(20, 26)))
    write_kv_torch(k_cache, v_cache, key, value, slots, scales)
    # Sequence 0: 9 tokens (5 cached + a 4-token chunk); sequence 1: 6 tokens, the last decoding.
    meta = AttentionMetadata.build([4, 1], [5, 5], [9, 6], [[0, 1, 2], [5, 6]], [5, 6, 7, 8, 25])
    q = torch.randn(5, heads, dim, generator=g)
    return q, k_cache, v_cache, meta, key, value, scales


def test_reference_over_fp8_cache_equals_attention_over_the_dequantized_values():
    scales = KVScales(k=0.02, v=0.01)
    q, kc, vc, meta, _, _, _ = _write_case(FP8_DTYPE, scales)
    assert kc.dtype == FP8_DTYPE and kc.float().abs().max() > 0
    deq_k, deq_v = kc.float() * scales.k, vc.float() * scales.v
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25, scales)
    ref_out, ref_lse = TorchReferenceBackend().forward(q, deq_k, deq_v, meta, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)


def test_fp8_cache_is_close_to_the_float_cache():
    """What e4m3 costs on random data: outputs within a few percent of the float32 cache's."""
    key_amax = 3 * 5.0  # |N(0, 3)| stays below 15 for these 15 x 32 draws
    scales = KVScales(k=key_amax * HEADROOM / FP8_MAX, v=5.0 * HEADROOM / FP8_MAX)
    q, kc, vc, meta, _, _, _ = _write_case(FP8_DTYPE, scales, seed=1)
    out, _ = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25, scales)
    q, kc, vc, meta, _, _, _ = _write_case(torch.float32, None, seed=1)
    exact, _ = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25)
    rel = (out - exact).norm() / exact.norm()
    assert 0 < rel < 0.06


def test_reference_over_int8_cache_equals_attention_over_the_dequantized_values():
    q, kc, vc, meta, key, _, scales = _write_case(torch.int8, None)
    assert kc.dtype == torch.int8 and kc.abs().max() == 127  # every written row reaches +-127
    # Written slots got their rows' scales, the others none.
    written = torch.tensor(list(range(9)) + list(range(20, 26)))
    kp = scales.k_pages.transpose(1, 2).reshape(-1, 2)  # [slot, kv head]
    assert torch.equal(kp[written], key.abs().amax(-1) / 127)
    assert not kp[torch.tensor([9, 19, 26])].any()
    deq_k, deq_v = dequantize_int8_cache(kc, scales.k_pages), dequantize_int8_cache(vc, scales.v_pages)
    out, lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25, scales)
    meta.host_plans.clear()  # the step's plan is made for one cache dtype
    ref_out, ref_lse = TorchReferenceBackend().forward(q, deq_k, deq_v, meta, 0.25)
    # The decode row in float32 either way; the chunk, on the CPU's C kernel, in bf16 dot products
    # (q and P rounded to bf16) where the float32 cache takes aten's float32 kernel.
    torch.testing.assert_close(out[4:], ref_out[4:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[4:], ref_lse[4:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:4], ref_out[:4], atol=4 * 2**-8, rtol=2**-8)
    torch.testing.assert_close(lse[:4], ref_lse[:4], atol=2e-2, rtol=2**-8)


def test_int8_cache_is_closer_to_the_float_cache_than_fp8():
    """On the same data, per-token int8 rows are several times closer to the float32 cache's
    outputs than e4m3 with a per-layer scale."""
    fp8_scales = KVScales(k=3 * 5.0 * HEADROOM / FP8_MAX, v=5.0 * HEADROOM / FP8_MAX)
    errs = {}
    q, kc, vc, meta, _, _, _ = _write_case(torch.float32, None, seed=1)
    exact, _ = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25)
    for dtype, scales in ((FP8_DTYPE, fp8_scales), (torch.int8, None)):
        q, kc, vc, meta, _, _, scales = _write_case(dtype, scales, seed=1)
        out, _ = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25, scales)
        errs[dtype] = float((out - exact).norm() / exact.norm())
    assert 0 < errs[torch.int8] < errs[FP8_DTYPE] / 3


def test_int8_k_shift_leaves_softmax_and_keeps_an_offset_channel_out_of_the_rows_range():
    """K with a channel far from zero in every token (as real models' K has): subtracting the
    channel means before the rows are quantized leaves attention's output as it was (lse moves
    by scale * q.mu) and takes most of the int8 error away."""
    q, kc, vc, meta, key, value, _ = _write_case(torch.float32, None, seed=2)
    offset = torch.zeros(key.shape[1:])
    offset[:, 3] = 40.0
    shifted_key = key + offset
    slots = torch.tensor(list(range(9)) + list(range(20, 26)))
    write_kv_torch(kc, vc, shifted_key, value, slots)
    exact, exact_lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25)
    mu = shifted_key.mean(0)
    write_kv_torch(kc, vc, shifted_key - mu, value, slots)
    meta.host_plans.clear()
    moved, moved_lse = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25)
    torch.testing.assert_close(moved, exact, atol=1e-5, rtol=1e-5)
    qmu = torch.einsum("tkgd,kd->tkg", q.view(5, 2, 2, -1), mu).reshape(5, 4)
    torch.testing.assert_close(moved_lse, exact_lse - 0.25 * qmu, atol=1e-4, rtol=1e-5)

    errs = {}
    for shift in (None, mu.contiguous()):
        _, kc8, vc8, _, _, _, scales = _write_case(torch.int8, None, seed=2)
        scales = KVScales(k_pages=scales.k_pages, v_pages=scales.v_pages, k_shift=shift)
        write_kv_torch(kc8, vc8, shifted_key, value, slots, scales)
        back = dequantize_int8_cache(kc8, scales.k_pages).view(-1, *key.shape[1:])[slots]
        assert torch.all((back + (0 if shift is None else shift) - shifted_key).abs()
                         <= scales.k_pages.transpose(1, 2).reshape(-1, 2)[slots, :, None] / 2 + 1e-5)
        meta.host_plans.clear()
        out, _ = TorchReferenceBackend().forward(q, kc8, vc8, meta, 0.25, scales)
        errs[shift is None] = float((out - exact).norm() / exact.norm())
    assert 0 < errs[False] < errs[True] / 3


def test_fp8_k_shift_keeps_an_offset_channel_out_of_the_scale():
    """The same offset channel in an FP8 cache: with the shift, K's scale covers only the spread
    around the means, and the output moves closer to the float cache's."""
    q, kc, vc, meta, key, value, _ = _write_case(torch.float32, None, seed=3)
    key = key.clone()
    key[:, :, 3] += 40.0
    slots = torch.tensor(list(range(9)) + list(range(20, 26)))
    write_kv_torch(kc, vc, key, value, slots)
    exact, _ = TorchReferenceBackend().forward(q, kc, vc, meta, 0.25)
    mu = key.mean(0).contiguous()
    errs = {}
    for shift in (None, mu):
        k_amax = float((key - (0 if shift is None else shift)).abs().max())
        scales = KVScales(k=k_amax * HEADROOM / FP8_MAX, v=5.0 * HEADROOM / FP8_MAX, k_shift=shift)
        k8, v8 = torch.zeros_like(kc, dtype=FP8_DTYPE), torch.zeros_like(vc, dtype=FP8_DTYPE)
        write_kv_torch(k8, v8, key, value, slots, scales)
        meta.host_plans.clear()
        out, _ = TorchReferenceBackend().forward(q, k8, v8, meta, 0.25, scales)
        errs[shift is None] = float((out - exact).norm() / exact.norm())
    assert 0 < errs[False] < 0.75 * errs[True]  # 4.7% against 7.0%: V and the other channels keep theirs


class _Layer:
    def __init__(self, backend):
        self.backend = backend
        self.kv_scales = None


def test_calibration_sets_each_layers_scales_from_its_amax():
    layers = [_Layer(TorchReferenceBackend()) for _ in range(2)]
    cache = torch.zeros(4, 4, 2, 8)
    key = torch.ones(3, 2, 8)
    value = torch.ones(3, 2, 8)

    def forward():
        for i, layer in enumerate(layers):
            k, v = key * (i + 1), value * 0.5
            k[1, 0, 3] = -7.0 * (i + 1)  # the largest |K| is negative
            layer.backend.write_kv(cache, cache.clone(), k, v, torch.arange(3))

    scales = calibrate_kv_scales(layers, forward)
    assert [layer.kv_scales is s for layer, s in zip(layers, scales)] == [True, True]
    for i, s in enumerate(scales):
        # K's channel means come off first; its scale covers what is left: -7(i+1) against the
        # channel's mean (1 - 7 + 1)(i+1) / 3 is the largest distance, 16/3 (i+1).
        mean = torch.ones(2, 8) * (i + 1)
        mean[0, 3] = (i + 1) * (1 - 7 + 1) / 3
        torch.testing.assert_close(s.k_shift, mean)
        assert s.k == pytest.approx(16 / 3 * (i + 1) * HEADROOM / FP8_MAX)
        assert s.v == pytest.approx(0.5 * HEADROOM / FP8_MAX)
    assert all(isinstance(layer.backend, TorchReferenceBackend) for layer in layers)  # unwrapped


def test_int8_calibration_gives_each_layer_its_k_channel_means():
    layers = [_Layer(TorchReferenceBackend()) for _ in range(2)]
    cache = torch.zeros(4, 4, 2, 8)
    keys = [torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(i)) + i for i in range(2)]

    def forward():
        for layer, k in zip(layers, keys):
            layer.backend.write_kv(cache, cache.clone(), k[:2], k[:2], torch.arange(2))
            layer.backend.write_kv(cache, cache.clone(), k[2:], k[2:], torch.arange(1))  # a second chunk

    scales = calibrate_kv_scales(layers, forward, "int8")
    assert [layer.kv_scales for layer in layers] == scales
    for s, k in zip(scales, keys):
        torch.testing.assert_close(s.k_shift, k.mean(0))
        assert s.k_pages is None and s.k == 1.0  # the pages come with the cache; no FP8 scale


@pytest.fixture(scope="module")
def llama_folder(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_engine_with_fp8_cache(llama_folder):
    """Calibrated scales on every layer, four times the blocks of a float32 cache in the same
    bytes, and the same greedy tokens whether prompts are prefilled whole, in chunks, or from
    the prefix cache (every path reads the same quantized KV)."""
    budget = 1 << 20
    f32 = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget)
    fp8 = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget, kv_cache_dtype="fp8")
    assert fp8.engine.stats().kv_blocks_total == 4 * f32.engine.stats().kv_blocks_total
    runner = fp8.engine.executor.runner
    assert runner.kv_caches[0][0].dtype == FP8_DTYPE
    scales = [layer.self_attn.kv_scales for layer in runner.model.model.layers]
    m = runner.config.model
    assert all(s is not None and s.k > 0 and s.v > 0 for s in scales)
    assert all(s.k_shift.shape == (m.num_key_value_heads, m.head_dim) for s in scales)

    prompts = [{"prompt_token_ids": p} for p in random_prompts([40, 7, 33], seed=5)]
    whole = [o.outputs[0].token_ids for o in fp8.generate(prompts, GREEDY)]
    again = [o.outputs[0].token_ids for o in fp8.generate(prompts, GREEDY)]  # prefix-cache hits
    chunked = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget, kv_cache_dtype="fp8",
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    assert again == whole
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == whole


def test_engine_with_int8_cache(llama_folder):
    """Scale pages on every layer; 1.6 times the blocks of a bf16 cache in the same bytes (at
    this model's head_dim 16 the scale takes 4 of a token's 16 + 4 bytes a KV head, 3% at 128);
    the same greedy tokens
    whether prompts are prefilled whole, in chunks, from the prefix cache or forked (n=2: the
    copy-on-write copies the tail block's scales too); and the float32 cache's tokens on most
    positions."""
    budget = 1 << 20
    bf16 = LLM(llama_folder, device="cpu", dtype="bfloat16", block_size=4, kv_cache_memory=budget)
    int8 = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget, kv_cache_dtype="int8")
    runner = int8.engine.executor.runner
    m = runner.config.model
    per_token = 2 * m.num_hidden_layers * m.num_key_value_heads * (m.head_dim + 4)
    assert int8.engine.stats().kv_blocks_total == budget // (4 * per_token)
    assert int8.engine.stats().kv_blocks_total >= 1.59 * bf16.engine.stats().kv_blocks_total
    assert runner.kv_caches[0][0].dtype == torch.int8
    scales = [layer.self_attn.kv_scales for layer in runner.model.model.layers]
    assert all(s.k_pages.shape == scale_pages(runner.kv_caches[0][0].shape) for s in scales)
    assert all(s.k_shift.shape == (m.num_key_value_heads, m.head_dim) and s.k_shift.abs().sum() > 0 for s in scales)

    prompts = [{"prompt_token_ids": p} for p in random_prompts([40, 7, 33], seed=5)]
    whole = [o.outputs[0].token_ids for o in int8.generate(prompts, GREEDY)]
    again = [o.outputs[0].token_ids for o in int8.generate(prompts, GREEDY)]  # prefix-cache hits
    assert again == whole
    chunked = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget, kv_cache_dtype="int8",
                  max_num_batched_tokens=8, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == whole
    forked = int8.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2))[0]
    assert [c.token_ids for c in forked.outputs] == [whole[0], whole[0]]
    f32 = LLM(llama_folder, device="cpu", block_size=4, kv_cache_memory=budget)
    exact = [o.outputs[0].token_ids for o in f32.generate(prompts, GREEDY)]
    same = sum(a == b for x, y in zip(whole, exact) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, exact))


@pytest.mark.parametrize(
    "kw", [{"tensor_parallel_size": 2}, {"attention_workers": 1}, {"kv_cache_dtype": "int4"}], ids=str
)
@pytest.mark.parametrize("cache", ["fp8", "int8"])
def test_8bit_cache_refuses_what_it_does_not_support(llama_folder, kw, cache):
    kw = {"kv_cache_dtype": cache, **kw}
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(llama_folder, device="cpu", **kw)
