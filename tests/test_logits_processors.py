"""Penalties, biases and masks (fapool.layers.logits_processors) against hand-computed logits,
and through the engine: each changes greedy output as specified."""

import pytest
import torch
from gpu_marks import needs_cuda
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.layers.logits_processors import LogitsEditor
from fapool.request import Request, RequestStatus


def apply_logits_processors(logits: torch.Tensor, reqs: list[Request]) -> None:
    """The edits with a fresh editor (no state kept between calls)."""
    LogitsEditor(logits.shape[-1], logits.device).apply(logits, reqs)


def _req(params: SamplingParams, prompt=(1, 2), output=(), eos=(0,)) -> Request:
    req = Request("r", list(prompt), params, 100, eos_token_ids=eos)
    req.output_token_ids = list(output)
    return req


def _apply(params: SamplingParams, logits, **kw) -> torch.Tensor:
    x = torch.tensor([logits], dtype=torch.float32)
    apply_logits_processors(x, [_req(params, **kw)])
    return x[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    got = _apply(
        SamplingParams(repetition_penalty=2.0), [1.0, 4.0, -2.0, 3.0, -1.0], prompt=(1,), output=(2,)
    )
    assert got.tolist() == [1.0, 2.0, -4.0, 3.0, -1.0]


def test_presence_and_frequency_penalties_use_output_counts():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = _apply(p, [0.0] * 5, prompt=(4,), output=(1, 1, 3))
    assert got.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]  # the prompt's token 4 untouched


def test_logit_bias_min_tokens_bad_words_and_allowed_ids():
    assert _apply(SamplingParams(logit_bias={2: 5.0, 0: -1.0}), [0.0] * 4).tolist() == [-1.0, 0.0, 5.0, 0.0]
    inf = float("-inf")
    p = SamplingParams(min_tokens=3, stop_token_ids=[3])
    assert _apply(p, [0.0] * 5, output=(1,)).tolist() == [inf, 0.0, 0.0, inf, 0.0]  # eos 0, stop 3
    assert _apply(p, [0.0] * 5, output=(1, 1, 1)).tolist() == [0.0] * 5  # enough tokens
    req = _req(SamplingParams(bad_words=["x"]), output=(4, 2))
    req.bad_words_token_ids = [[3], [2, 1], [4, 4]]  # 3 always; 1 after 2; 4 after 4
    x = torch.zeros(1, 5)
    apply_logits_processors(x, [req])
    assert x[0].tolist() == [0.0, inf, 0.0, inf, 0.0]
    got = _apply(SamplingParams(allowed_token_ids=[1, 3]), [5.0, 1.0, 2.0, 0.5])
    assert got.tolist() == [inf, 1.0, inf, 0.5]


def test_an_editor_kept_across_steps_equals_a_fresh_one():
    """The editor's device state (output counts, prompt tokens per slot) follows each request's
    new tokens step by step, frees the slots of finished requests for new ones, and edits
    every row as a fresh editor would, whatever the batch."""
    g = torch.Generator().manual_seed(0)
    vocab = 50
    kinds = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.9),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias={3: 1.5, 7: -2.0}),
        SamplingParams(min_tokens=4, stop_token_ids=[5], allowed_token_ids=[1, 2, 5, 9]),
        SamplingParams(),
    ]
    editor = LogitsEditor(vocab, "cpu")
    reqs = [_req(p, prompt=torch.randint(0, vocab, (6,), generator=g).tolist()) for p in kinds]
    for req, rid in zip(reqs, "abcde"):
        req.request_id = rid
    for step in range(8):
        if step == 4:  # one finishes; a new request takes its slot
            reqs[1].status = RequestStatus.FINISHED_STOPPED
            new = _req(SamplingParams(repetition_penalty=1.3, presence_penalty=0.2), prompt=[4, 4, 8])
            new.request_id = "f"
            reqs.append(new)
        live = [r for r in reqs if not r.finished]
        logits = torch.randn(len(live), vocab, generator=g)
        fresh = logits.clone()
        editor.apply(logits, live)
        apply_logits_processors(fresh, live)
        assert torch.equal(logits, fresh), step
        for r in live:
            r.output_token_ids.append(int(torch.randint(0, vocab, (1,), generator=g)))
    assert editor.counts.shape[0] == 8  # three penalised at once: one growth; the freed slot went to "f"


@needs_cuda
def test_penalties_kernel_matches_the_torch_path():
    """On CUDA the penalties run as one Triton launch; over steps of growing outputs, with
    slots reused, it gives the torch path's logits (the CPU editor) to float32 rounding."""
    g = torch.Generator().manual_seed(1)
    vocab = 5000
    kinds = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.9),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingParams(),
    ]
    reqs = [_req(p, prompt=torch.randint(0, vocab, (40,), generator=g).tolist()) for p in kinds]
    for req, rid in zip(reqs, "abcd"):
        req.request_id = rid
    cpu, gpu = LogitsEditor(vocab, "cpu"), LogitsEditor(vocab, "cuda")
    for _ in range(6):
        logits = torch.randn(len(reqs), vocab, generator=g) * 4
        on_gpu = logits.cuda()
        cpu.apply(logits, reqs)
        gpu.apply(on_gpu, reqs)
        torch.testing.assert_close(on_gpu.cpu(), logits, rtol=1e-6, atol=1e-6)
        for r in reqs:
            r.output_token_ids += torch.randint(0, vocab, (3,), generator=g).tolist()


@needs_cuda
def test_penalties_kernel_counts_a_steps_token_itself():
    """The Triton launch counts a row's one new token itself: one from the host (a synchronous
    step), or the in-flight step's token on the device at any row of it (async). Logits and the
    editor's counts equal the torch path's, tokens on vocab-block edges included."""
    g = torch.Generator().manual_seed(2)
    vocab = 9000  # three blocks of the kernel's 4096
    edges = [0, 4095, 4096, 8191, 8192, vocab - 1]
    kinds = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.9),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.5),
    ]
    reqs = [_req(p, prompt=torch.randint(0, vocab, (40,), generator=g).tolist()) for p in kinds]
    for req, rid in zip(reqs, "abc"):
        req.request_id = rid
    cpu, gpu = LogitsEditor(vocab, "cpu"), LogitsEditor(vocab, "cuda")

    def token(k: int) -> int:
        return edges[k % len(edges)] if k % 2 else int(torch.randint(0, vocab, (1,), generator=g))

    for step in range(10):
        logits = torch.randn(len(reqs), vocab, generator=g) * 4
        on_gpu = logits.cuda()
        if step % 3 == 2:  # async: each request's latest token still in flight, rows shuffled
            flight = torch.tensor([token(step + k) for k in range(len(reqs) + 2)])
            perm = torch.randperm(len(reqs) + 2, generator=g).tolist()
            rows = {r.request_id: i for r, i in zip(reqs, perm)}
            cpu.apply(logits, reqs, (flight, rows))
            gpu.apply(on_gpu, reqs, (flight.cuda(), rows))
            for r in reqs:  # the token reaches the host after the edit
                r.output_token_ids.append(int(flight[rows[r.request_id]]))
        else:
            cpu.apply(logits, reqs)
            gpu.apply(on_gpu, reqs)
            for k, r in enumerate(reqs):
                r.output_token_ids.append(token(step + k))
        torch.testing.assert_close(on_gpu.cpu(), logits, rtol=1e-6, atol=1e-6)
        assert torch.equal(gpu.counts.cpu(), cpu.counts), step


def test_invalid_values_are_refused():
    for kw in (
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3},
        {"logit_bias": {1: 101}},
        {"min_tokens": 9, "max_tokens": 4},
        {"allowed_token_ids": []},
        {"bad_words": [" "]},
    ):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**kw)


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["llama"][0], device="cpu", block_size=4, num_kv_blocks=256)


def _greedy(llm, **kw) -> list[int]:
    prompt = random_prompts([12], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 12), **kw)
    return llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids


def test_engine_applies_them(llm):
    free = _greedy(llm)
    # A bias large enough makes token 7 every choice; allowed ids restrict every choice.
    assert set(_greedy(llm, logit_bias={7: 100.0})) == {7}
    assert set(_greedy(llm, allowed_token_ids=[5, 9])) <= {5, 9}
    # min_tokens: a stop token the model would emit at once is masked until 8 tokens exist.
    stopped = _greedy(llm, stop_token_ids=[free[0]])
    assert stopped == [free[0]]
    longer = _greedy(llm, stop_token_ids=[free[0]], min_tokens=8)
    assert len(longer) >= 8 and free[0] not in longer[:7]
    # The free greedy continuation repeats tokens within 24; each penalty removes the repeats.
    repeats = _greedy(llm, max_tokens=24)
    assert len(set(repeats)) < 24
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.5}):
        penalised = _greedy(llm, max_tokens=24, **kw)
        assert penalised[:11] == repeats[:11] and len(set(penalised)) == 24, kw


def test_engine_refuses_out_of_vocabulary_ids_and_bad_words_without_a_tokenizer(llm):
    from fapool.engine.llm_engine import RequestError

    with pytest.raises(RequestError, match="logit_bias and allowed_token_ids"):
        llm.engine.add_request([1, 2], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(RequestError, match="bad_words needs the model's tokenizer"):
        llm.engine.add_request([1, 2], SamplingParams(bad_words=["no"]))
