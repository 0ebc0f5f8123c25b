"""CUDA-graphed decode steps and the fused kernels.

On the CPU: the host side of the graphs' static buffers (DecodeInputs) against a plain rebuild,
through row shifts, block appends, copy-on-write of the tail block, preemption and padding.
On a GPU (skipped elsewhere, CI has none): greedy tokens with graphs equal those without, and
without the fused kernels, through finishing requests, n > 1 (copy-on-write) and preemption;
the fused kernels against the torch code they replace.
"""

import pytest
import torch
from gpu_marks import needs_cuda as needs_gpu
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.core.scheduler import ScheduledRequest
from fapool.request import Request
from fapool.worker.cuda_graphs import DecodeInputs, capture_sizes

BS = 16


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(100)[-3:] == [80, 96, 112]
    assert capture_sizes(129)[-2:] == [128, 160]


def _req(rid, prompt_len, out_len, seed):
    g = torch.Generator().manual_seed(seed)
    req = Request(rid, torch.randint(0, 1000, (prompt_len,), generator=g).tolist(), SamplingParams(), 100)
    req.output_token_ids = torch.randint(0, 1000, (out_len,), generator=g).tolist()
    return req


def _sched(req, blocks):
    p = req.num_tokens - 1
    return ScheduledRequest(req, 1, p, list(blocks))


def _expected(scheduled, padded, max_blocks):
    vec = torch.zeros(5, padded, dtype=torch.int64)
    vec[2] = vec[4] = -1  # slots and in-flight sources of padding rows
    table = {}
    for i, s in enumerate(scheduled):
        p = s.num_computed_tokens
        vec[0, i] = s.request.all_token_ids[p]
        vec[1, i] = p
        vec[2, i] = s.block_ids[p // BS] * BS + p % BS
        vec[3, i] = p + 1
        table[i] = s.block_ids
    return vec, table


def _check(inputs, scheduled, padded):
    vec, table = _expected(scheduled, padded, inputs.max_blocks)
    assert torch.equal(inputs.vec[:, :padded], vec)
    for i, blocks in table.items():
        assert inputs.table[i, : len(blocks)].tolist() == blocks


def test_decode_inputs_incremental_table_matches_rebuild():
    inputs = DecodeInputs(max_batch=8, max_blocks=16, block_size=BS, pin=False)
    reqs = {r: _req(r, 20 + 7 * i, 3, i) for i, r in enumerate("abcd")}
    blocks = {r: list(range(10 * i, 10 * i + -(-reqs[r].num_tokens // BS))) for i, r in enumerate("abcd")}
    batch = [_sched(reqs[r], blocks[r]) for r in "abcd"]
    inputs.fill(batch, 4)
    _check(inputs, batch, 4)
    written = inputs.rows_rewritten

    def step(r):  # one more token; a new block when the tail is full
        reqs[r].output_token_ids.append(5)
        if (reqs[r].num_tokens - 1) // BS >= len(blocks[r]):
            blocks[r].append(100 + len(blocks[r]) + 10 * "abcd".index(r))

    # Decode steps: tokens appended, a block appended when the tail fills.
    for _ in range(20):
        for r in "abcd":
            step(r)
        batch = [_sched(reqs[r], blocks[r]) for r in "abcd"]
        inputs.fill(batch, 4)
        _check(inputs, batch, 4)
    # Incremental: about one entry per row per step, not whole tables.
    assert inputs.rows_rewritten - written <= 20 * 4 * 2

    # Copy-on-write replaced b's tail block; c finished, so d moves up a row (full rewrite).
    step("b")
    step("d")
    blocks["b"][-1] = 999
    batch = [_sched(reqs[r], blocks[r]) for r in "abd"]
    inputs.fill(batch, 4)
    _check(inputs, batch, 4)
    assert inputs.vec[2, 3] == -1 and inputs.vec[3, 3] == 0  # padding row

    # Preemption: a's table was rebuilt with other blocks and the same length.
    reqs["a"].metrics.num_preemptions += 1
    blocks["a"] = [b + 500 for b in blocks["a"]]
    batch = [_sched(reqs[r], blocks[r]) for r in "abd"]
    inputs.fill(batch, 4)
    _check(inputs, batch, 4)


def test_decode_inputs_token_in_flight():
    """Async scheduling: a row whose input token is still on the device gets its source row."""
    inputs = DecodeInputs(max_batch=4, max_blocks=8, block_size=BS, pin=False)
    a, b = _req("a", 20, 2, 0), _req("b", 33, 0, 1)
    b.num_output_placeholders = 1  # b's first token was sampled by the step in flight
    batch = [_sched(a, [0, 1]), ScheduledRequest(b, 1, 33, [2, 3, 4])]
    max_kv, gather = inputs.fill(batch, 4, prev_rows={"b": 5})
    assert (max_kv, gather) == (34, True)
    assert inputs.vec[DecodeInputs.SRC, :4].tolist() == [-1, 5, -1, -1]
    assert inputs.vec[DecodeInputs.IDS, 1] == 0 and inputs.vec[DecodeInputs.IDS, 0] == a.all_token_ids[21]
    with pytest.raises(RuntimeError, match="neither known nor in flight"):
        inputs.fill(batch, 4, prev_rows={})
    assert not inputs.src_in_order  # row 1 reads row 5; row 0's token is known
    b.output_token_ids.append(7)  # the token arrived: read from the host again
    b.num_output_placeholders = 0
    assert inputs.fill(batch, 4)[1] is False and inputs.vec[DecodeInputs.IDS, 1] == 7
    assert not inputs.src_in_order

    # Both tokens in flight, each at its own row of the step in flight: the gather is a copy.
    a.num_output_placeholders = b.num_output_placeholders = 1
    batch = [ScheduledRequest(a, 1, 22, [0, 1]), ScheduledRequest(b, 1, 34, [2, 3, 4])]
    assert inputs.fill(batch, 4, prev_rows={"a": 0, "b": 1})[1] is True and inputs.src_in_order
    assert inputs.fill(batch, 4, prev_rows={"a": 1, "b": 0})[1] is True and not inputs.src_in_order


def test_decode_inputs_rejects_overflow():
    inputs = DecodeInputs(max_batch=2, max_blocks=2, block_size=BS, pin=False)
    req = _req("x", 40, 0, 0)
    with pytest.raises(ValueError, match="exceeds"):
        inputs.fill([_sched(req, [0, 1, 2])], 1)
    with pytest.raises(ValueError, match="does not fit"):
        inputs.fill([_sched(req, [0, 1])] * 3, 4)


# --- GPU ----------------------------------------------------------------------------------


def _run(folder, graphs=True, fused=True, dtype="float32", **kw):
    from fapool.layers.fused import unfuse_model

    kw.setdefault("num_kv_blocks", 512)  # not 90% of the card: several engines live at once
    llm = LLM(folder, device="cuda", dtype=dtype, block_size=BS, max_num_seqs=16, **kw)
    runner = llm.engine.executor.runner
    runner.use_cuda_graphs = graphs
    if not fused:
        unfuse_model(runner.model)
    return llm, runner


def _greedy_tokens(llm, prompts, max_tokens, n=1):
    params = [SamplingParams(temperature=0.0, max_tokens=m, n=n, ignore_eos=True) for m in max_tokens]
    return [
        [c.token_ids for c in o.outputs]
        for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    ]


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_graphs_match_eager_and_unfused(tiny_checkpoints, arch):
    folder = tiny_checkpoints[arch][0]
    prompts = random_prompts([37, 3, 120, 9, 64, 1, 200], seed=5)
    max_tokens = [40, 12, 25, 33, 5, 40, 18]  # finishing at different steps shifts the rows
    llm, runner = _run(folder)
    with_graphs = _greedy_tokens(llm, prompts, max_tokens)
    assert runner.decode_graphs is not None and runner.decode_graphs.graphs, "no decode step used a graph"
    eager = _greedy_tokens(_run(folder, graphs=False)[0], prompts, max_tokens)
    unfused = _greedy_tokens(_run(folder, graphs=False, fused=False)[0], prompts, max_tokens)
    assert with_graphs == eager == unfused


@needs_gpu
@pytest.mark.parametrize("warp_split_min_kv", [None, 100])
@pytest.mark.parametrize("cache", ["fp8", "int8"])
def test_8bit_kv_cache_graphs_match_eager(tiny_checkpoints, monkeypatch, warp_split_min_kv, cache):
    """An FP8 or int8 cache through the Triton KV write, prefill and decode kernels: graphs, eager
    and unfused give the same greedy tokens (they read the same quantized KV). float32
    activations, as the other graph tests: in bf16 the graphs' pinned split count rounds
    differently. With the warp-split kernel from 100 keys on, steps on both sides of it pin
    their own kernel."""
    if warp_split_min_kv is not None:
        from fapool.attention import triton_decode

        monkeypatch.setattr(triton_decode, "FP8_WARP_SPLIT_MIN_KV", warp_split_min_kv)
    folder = tiny_checkpoints["llama"][0]
    prompts = random_prompts([37, 3, 120, 9, 64, 1, 200], seed=9)
    max_tokens = [40, 12, 25, 33, 5, 40, 18]
    kw = {"kv_cache_dtype": cache}
    llm, runner = _run(folder, **kw)
    assert runner.kv_caches[0][0].dtype == (torch.float8_e4m3fn if cache == "fp8" else torch.int8)
    with_graphs = _greedy_tokens(llm, prompts, max_tokens)
    assert runner.decode_graphs is not None and runner.decode_graphs.graphs
    kernels = {warp_split for _, _, warp_split, _ in runner.decode_graphs.graphs}
    assert kernels == ({False} if warp_split_min_kv is None else {False, True})
    eager = _greedy_tokens(_run(folder, graphs=False, **kw)[0], prompts, max_tokens)
    unfused = _greedy_tokens(_run(folder, graphs=False, fused=False, **kw)[0], prompts, max_tokens)
    assert with_graphs == eager == unfused


@needs_gpu
def test_graphs_through_fork_and_preemption(tiny_checkpoints):
    folder = tiny_checkpoints["llama"][0]
    prompts = random_prompts([30, 50, 70, 17], seed=8)
    # n=2: siblings share the prompt's tail block (copy-on-write); 24 blocks force preemption.
    kw = {"num_kv_blocks": 24, "max_num_batched_tokens": 64}
    llm, runner = _run(folder, **kw)
    with_graphs = _greedy_tokens(llm, prompts, [60] * 4, n=2)
    assert llm.engine.scheduler.num_preemptions > 0
    assert runner.decode_graphs.graphs
    eager = _greedy_tokens(_run(folder, graphs=False, **kw)[0], prompts, [60] * 4, n=2)
    assert with_graphs == eager


@needs_gpu
def test_async_scheduling_matches_sync(tiny_checkpoints):
    """Async steps read the in-flight step's tokens on the device (a gather before the graph
    replay, or in the eager path); the tokens equal synchronous steps, through preemption."""
    folder = tiny_checkpoints["llama"][0]
    prompts = random_prompts([37, 3, 120, 9, 64, 1, 200], seed=6)
    max_tokens = [40, 12, 25, 33, 5, 40, 18]
    for kw in ({}, {"num_kv_blocks": 24, "max_num_batched_tokens": 64}):
        llm, runner = _run(folder, async_scheduling=True, **kw)
        assert llm.engine.async_scheduling
        asyn = _greedy_tokens(llm, prompts, max_tokens)
        assert runner.decode_graphs is not None and runner.decode_graphs.graphs
        sync = _greedy_tokens(_run(folder, async_scheduling=False, **kw)[0], prompts, max_tokens)
        assert asyn == sync
        if kw:
            assert llm.engine.scheduler.num_preemptions > 0


def _assert_same_outputs(graphed, eager):
    """The same tokens, and logprobs within float32 rounding of the log-softmax."""
    for g, e in zip(graphed, eager):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        if e.outputs[0].logprobs is not None:
            for lg, le in zip(g.outputs[0].logprobs, e.outputs[0].logprobs):
                assert [x.token_id for x in lg] == [x.token_id for x in le]
                assert [x.logprob for x in lg] == pytest.approx([x.logprob for x in le], abs=1e-4)


@needs_gpu
def test_sampling_inside_graphs_and_async_equals_eager_sync(tiny_checkpoints):
    """Seeded sampled requests (every filter, logprobs) beside greedy ones: drawn inside the
    decode graphs with async scheduling, the tokens and logprobs equal eager synchronous
    steps' (the same counter-based draws from the same logits)."""
    folder = tiny_checkpoints["llama"][0]
    prompts = random_prompts([37, 3, 120, 9, 64, 1], seed=7)
    params = [
        SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=25, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.7, top_k=10, min_p=0.02, seed=3, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=1.1, seed=4, max_tokens=12, ignore_eos=True),
        SamplingParams(
            temperature=0.6, top_p=0.8, top_k=40, seed=5, max_tokens=30, ignore_eos=True, logprobs=0
        ),
    ]
    ids = [{"prompt_token_ids": p} for p in prompts]
    llm, runner = _run(folder, async_scheduling=True)
    graphed = llm.generate(ids, params)
    assert runner.decode_graphs.graphs
    eager = _run(folder, graphs=False, async_scheduling=False)[0].generate(ids, params)
    _assert_same_outputs(graphed, eager)


@needs_gpu
def test_edited_logits_with_graphs_and_async_equal_eager_sync(tiny_text_model):
    """Penalties, biases, min_tokens, bad words and grammar masks beside plain rows: the decode
    graph runs the forward pass, the edits and the draw follow on the device (a launch in
    halves; after the previous step reaches the host where a grammar reads it); tokens and
    logprobs equal eager synchronous steps'."""
    from fapool.sampling_params import StructuredOutputs

    params = [
        SamplingParams(
            temperature=0.8, top_p=0.95, seed=1, max_tokens=30, repetition_penalty=1.2, logprobs=2
        ),
        SamplingParams(temperature=0.0, max_tokens=20, presence_penalty=0.4, frequency_penalty=0.6),
        SamplingParams(
            temperature=1.0, seed=2, max_tokens=25, logit_bias={100: 2.0}, min_tokens=10, bad_words=["e"]
        ),
        SamplingParams(
            temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputs(choice=["red", "green"])
        ),
        SamplingParams(
            temperature=0.7, seed=3, max_tokens=12, structured_outputs=StructuredOutputs(regex=r"[0-9]{3}")
        ),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    ]
    prompts = ["Alpha", "Beta gamma", "Delta", "Colour:", "Number:", "Zeta eta theta"]
    llm, runner = _run(tiny_text_model, async_scheduling=True)
    halves = []
    forward = llm.engine.executor.launch_forward
    llm.engine.executor.launch_forward = lambda sched: (halves.append(1), forward(sched))[1]
    graphed = llm.generate(prompts, params)
    assert runner.decode_graphs.graphs and len(halves) > 10
    eager = _run(tiny_text_model, graphs=False, async_scheduling=False)[0].generate(prompts, params)
    _assert_same_outputs(graphed, eager)
    assert graphed[3].outputs[0].text in {"red", "green"}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_match_torch(dtype):
    from fapool.layers import fused
    from fapool.layers.activation import Activation
    from fapool.layers.norm import rms_norm
    from fapool.layers.rotary import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(37, 4096, device=dev, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(4096, device=dev)).to(dtype)
    ref = rms_norm(x, w, 1e-5)
    got = fused.rms_norm(x, w, 1e-5)
    assert (got.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-7
    delta = torch.randn_like(x)
    total, normed = fused.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(total, x + delta)  # the residual sum rounds exactly as torch's does
    ref = rms_norm(x + delta, w, 1e-5)
    assert (normed.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-7

    table = torch.randn(1000, 4096, device=dev, dtype=dtype)
    idx = torch.randint(0, 1000, (37,), device=dev)
    assert torch.equal(fused.gather_rows(table, idx), table.index_select(0, idx))

    qkv = torch.randn(37, (32 + 2 * 8) * 128, device=dev, dtype=dtype)
    q = qkv[:, : 32 * 128].view(37, 32, 128)  # strided views, as the model passes them
    k = qkv[:, 32 * 128 : 40 * 128].view(37, 8, 128)
    cos, sin = RotaryEmbedding(128, 4096).to(dev)(torch.randint(0, 4096, (37,), device=dev))
    qo, ko = fused.rotary(q, k, cos, sin)
    for got, want in ((qo, apply_rotary(q, cos, sin)), (ko, apply_rotary(k, cos, sin))):
        assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7

    gate_up = torch.randn(37, 2 * 1000, device=dev, dtype=dtype)
    for act in fused.FUSED_ACTS:
        gate, up = gate_up.chunk(2, dim=-1)
        want = Activation(act)(gate) * up
        got = fused.act_and_mul(gate_up, act)
        assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7, act


@needs_gpu
def test_pdl_graphs_equal_plain_launches(tiny_checkpoints, monkeypatch):
    """Programmatic dependent launch changes when kernels start, never what they compute: bf16
    decode graphs with async scheduling give bitwise the same greedy and seeded tokens and
    logprobs with it (the default on Hopper) and without it (FAPOOL_PDL=0). A kernel that read
    its predecessor's output before `wait_predecessor` would differ here."""
    from fapool.layers.triton_pdl import pdl_enabled

    folder = tiny_checkpoints["llama"][0]
    prompts = random_prompts([37, 3, 120, 9, 64, 1, 200], seed=11)
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=30, ignore_eos=True, logprobs=1),
    ] * 4
    ids = [{"prompt_token_ids": p} for p in prompts]
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FAPOOL_PDL", flag)
        llm, runner = _run(folder, dtype="bfloat16", async_scheduling=True)
        assert pdl_enabled(torch.empty(1, device="cuda")) == (
            flag == "1" and torch.cuda.get_device_capability()[0] >= 9
        )
        outs[flag] = llm.generate(ids, params[: len(ids)])
        assert runner.decode_graphs.graphs
    for a, b in zip(outs["1"], outs["0"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [[(x.token_id, x.logprob) for x in lp] for lp in a.outputs[0].logprobs] == [
            [(x.token_id, x.logprob) for x in lp] for lp in b.outputs[0].logprobs
        ]
