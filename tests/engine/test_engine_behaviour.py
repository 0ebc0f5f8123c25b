"""Engine behaviour on a tiny Llama: batch invariance, prefix caching, preemption, copy-on-write
for n > 1, seeded sampling, and bad input that fails alone."""

import pytest

from fapool import LLM, SamplingParams
from fapool.engine.llm_engine import RequestError
from tiny_models import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


@pytest.fixture(scope="module")
def llama_folder(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]


def _llm(folder, **kw):
    kw.setdefault("num_kv_blocks", 256)
    return LLM(folder, device="cpu", block_size=4, **kw)


def _tokens(outs):
    return [o.token_ids for o in outs]


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_batch_invariance(llama_folder):
    llm = _llm(llama_folder, max_num_batched_tokens=64)
    prompts = random_prompts([37, 3, 120, 9, 64, 1], seed=11)
    alone = [llm.generate(_ids([p]), GREEDY)[0].token_ids for p in prompts]
    together = _tokens(llm.generate(_ids(prompts), GREEDY))
    assert together == alone


def test_prefix_cache_hits_and_same_output(llama_folder):
    prefix = random_prompts([48], seed=3)[0]
    tails = random_prompts([5, 7, 2], seed=4)
    prompts = [prefix + t for t in tails]
    cold = _tokens(_llm(llama_folder, enable_prefix_caching=False).generate(_ids(prompts), GREEDY))
    llm = _llm(llama_folder)
    first = llm.generate(_ids(prompts[:1]), GREEDY)
    hits_before = llm.engine.stats().prefix_cache_hit_blocks
    rest = llm.generate(_ids(prompts[1:]), GREEDY)
    hits = llm.engine.stats().prefix_cache_hit_blocks - hits_before
    assert hits >= 2 * (48 // 4)  # both later prompts reuse the whole 48-token prefix
    assert rest[0].metrics.num_cached_tokens == 48
    assert _tokens(first + rest) == cold
    # Served again: all 13 full blocks of the 53-token prompt hit, one token is computed.
    again = llm.generate(_ids(prompts[:1]), GREEDY)
    assert again[0].token_ids == cold[0]
    assert again[0].metrics.num_cached_tokens == 52
    # A prompt made only of cached full blocks still computes its last block for the logits.
    alone = llm.generate(_ids([prefix]), GREEDY)[0]
    assert alone.metrics.num_cached_tokens == 48 - 4
    assert alone.token_ids == _llm(llama_folder, enable_prefix_caching=False).generate(_ids([prefix]), GREEDY)[0].token_ids


def test_preemption_keeps_outputs(llama_folder):
    prompts = random_prompts([30, 25, 41, 18, 33, 27], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    roomy = _tokens(_llm(llama_folder).generate(_ids(prompts), params))
    # 24 blocks of 4 tokens hold 96 tokens: every request fits alone (<= 71 tokens), but
    # the batch does not, so running requests get preempted and recomputed.
    tight = _llm(llama_folder, num_kv_blocks=24, enable_prefix_caching=False)
    outs = tight.generate(_ids(prompts), params)
    assert tight.engine.stats().num_preemptions > 0
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    assert _tokens(outs) == roomy
    assert tight.engine.stats().kv_blocks_used == 0  # everything freed at the end


def test_copy_on_write_parallel_sampling(llama_folder):
    """n = 3 computes the prompt once and forks; the shared partial tail block is copied on
    first write. Each completion equals a separate n = 1 request seeded like its sibling."""
    prompt = random_prompts([10], seed=6)[0]  # 10 tokens: the tail block (4 tokens) is partial
    base = dict(temperature=0.9, top_k=50, max_tokens=16)
    llm = _llm(llama_folder)
    copies = []
    runner = llm.engine.executor.runner
    original = runner.copy_blocks
    runner.copy_blocks = lambda c: (copies.extend(c), original(c))[1]
    group = llm.generate(_ids([prompt]), SamplingParams(n=3, seed=100, **base))[0]
    assert [c.index for c in group.outputs] == [0, 1, 2]
    assert len(copies) >= 2  # two siblings had to copy the shared partial block
    singles = [
        llm.generate(_ids([prompt]), SamplingParams(seed=100 + i, **base))[0].token_ids for i in range(3)
    ]
    assert [c.token_ids for c in group.outputs] == singles
    assert len({tuple(s) for s in singles}) > 1  # the siblings really sampled differently
    assert llm.engine.stats().kv_blocks_used == 0


def test_greedy_n_gives_identical_completions(llama_folder):
    llm = _llm(llama_folder)
    out = llm.generate(_ids(random_prompts([13], seed=7)), SamplingParams(n=2, temperature=0.0, max_tokens=8))[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids
    assert len(out.outputs) == 2


def test_seeded_sampling_is_reproducible(llama_folder):
    llm = _llm(llama_folder)
    prompts = _ids(random_prompts([12, 20], seed=8))
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16)
    a = _tokens(llm.generate(prompts, p))
    b = _tokens(llm.generate(prompts, p))
    c = _tokens(llm.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, seed=43, max_tokens=16)))
    assert a == b
    assert a != c


def test_logprobs_are_returned(llama_folder):
    llm = _llm(llama_folder)
    out = llm.generate(_ids(random_prompts([6], seed=9)), SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for tok, entry in zip(out.token_ids, lps):
        assert entry[0].token_id == tok
        assert len(entry) == 4
        assert entry[1].token_id == tok  # greedy: the chosen token is the top alternative
        assert entry[0].logprob <= 0.0


def test_bad_requests_fail_alone(llama_folder):
    llm = _llm(llama_folder, max_model_len=64)
    good = random_prompts([5, 9], seed=10)
    outs = llm.generate(
        [
            {"prompt_token_ids": good[0]},
            {"prompt_token_ids": []},
            {"prompt_token_ids": list(range(3, 3 + 80))},  # over max_model_len
            {"prompt_token_ids": [5, 999999]},  # not in the vocabulary
            {"nonsense": 1},
            {"prompt_token_ids": good[1]},
        ],
        GREEDY,
        errors="return",
    )
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 20
    assert outs[5].finish_reason == "length" and len(outs[5].token_ids) == 20
    assert "empty" in outs[1].error
    assert "max_model_len" in outs[2].error
    assert "vocab" in outs[3].error or "[0, 256)" in outs[3].error
    assert "prompt_token_ids" in outs[4].error
    for o in outs[1:5]:
        assert o.finish_reason == "error" and o.finished


def test_a_bad_prompt_raises_naming_its_index_and_nothing_runs(llama_folder):
    llm = _llm(llama_folder, max_model_len=64)
    good = random_prompts([5], seed=10)[0]
    with pytest.raises(ValueError, match=r"prompt 1: .*empty"):
        llm.generate([{"prompt_token_ids": good}, {"prompt_token_ids": []}], GREEDY)
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_blocks_used == 0
    with pytest.raises(ValueError, match="errors must be"):
        llm.generate([good], GREEDY, errors="ignore")


@pytest.mark.parametrize(
    "ids", [[5, -1], [5, 256], [5, 2.0], [5, True], [5, "7"]], ids=["negative", "past_vocab", "float", "bool", "str"]
)
def test_prompt_token_ids_outside_the_vocabulary_or_not_ints_are_refused(llama_folder, ids):
    llm = _llm(llama_folder, max_model_len=64)
    with pytest.raises(RequestError, match=r"ints in \[0, 256\)"):
        llm.engine.add_request(ids, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_request_that_can_never_fit_is_rejected_at_admission(llama_folder):
    llm = _llm(llama_folder, num_kv_blocks=8)  # 32 tokens in all
    with pytest.raises(RequestError, match="KV blocks"):
        llm.engine.add_request(list(range(3, 23)), SamplingParams(max_tokens=40))
    # max_tokens is capped by max_model_len, not by the cache: 20 + 12 fits exactly.
    out = llm.generate(_ids([list(range(3, 23))]), SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert len(out.token_ids) == 12


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))


def test_abort_frees_blocks(llama_folder):
    llm = _llm(llama_folder)
    engine = llm.engine
    rid = engine.add_request(random_prompts([30], seed=12)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort_request(rid)
    assert engine.stats().kv_blocks_used == 0
    assert not engine.has_unfinished_requests()


def test_a_row_that_cannot_be_sampled_fails_alone(llama_folder):
    """Non-finite logits for one request end that request with an error; the batch goes on."""
    llm = _llm(llama_folder)
    engine = llm.engine
    original = engine.executor.runner.execute

    def poisoned(out):
        logits, due = original(out)
        if logits is not None:
            logits = logits.clone()
            for i, s in enumerate(due):
                if s.request.request_id == "0":
                    logits[i] = float("nan")
        return logits, due

    engine.executor.runner.execute = poisoned
    prompts = random_prompts([7, 9], seed=13)
    outs = llm.generate(_ids(prompts), SamplingParams(temperature=1.0, seed=1, max_tokens=5))
    assert outs[0].finish_reason == "error" and "sampling failed" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5
    assert engine.stats().kv_blocks_used == 0


def test_output_kinds(llama_folder):
    """CUMULATIVE: each output holds everything so far; DELTA: only what is new, the pieces adding
    up to the cumulative output; FINAL_ONLY: one output, at the end. The tokens are the same."""
    from fapool import RequestOutputKind

    llm = LLM(llama_folder, device="cpu", block_size=4, num_kv_blocks=256)
    eng = llm.engine
    prompts = random_prompts([11, 5], seed=31)
    seen: dict = {}
    for kind in RequestOutputKind:
        params = SamplingParams(temperature=0.0, max_tokens=9, n=2, seed=1, output_kind=kind)
        ids = [eng.add_request(p, params) for p in prompts]
        outs = {i: [] for i in ids}
        while eng.has_unfinished_requests():
            for out in eng.step():
                outs[out.request_id].append(out)
        seen[kind] = [outs[i] for i in ids]
    for cum, delta, final in zip(*(seen[k] for k in RequestOutputKind)):
        assert len(final) == 1 and final[0].finished and len(cum) > 2 and len(delta) == len(cum)
        for index in range(2):
            pieces = [c for o in delta for c in o.outputs if c.index == index]
            joined = [t for c in pieces for t in c.token_ids]
            full = next(c for c in cum[-1].outputs if c.index == index)
            assert joined == full.token_ids == next(c for c in final[0].outputs if c.index == index).token_ids
            assert len(full.token_ids) == 9 and max(len(c.token_ids) for c in pieces) == 1
