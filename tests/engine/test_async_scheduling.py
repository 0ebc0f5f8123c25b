"""Async scheduling (a step is launched before the previous one's tokens reach the host): the
tokens must be exactly those of the synchronous engine, through chunked prefill, prefix hits,
stops found one step late, preemption, aborts and batches that fall back to synchronous steps.

On the CPU the device work is not asynchronous, but the bookkeeping is the same code: tokens
on the "device" feed the next step, placeholders, blind steps for requests that just stopped.
"""

import pytest
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.layers.logits_processors import LogitsEditor


@pytest.fixture(scope="module")
def llama_folder(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]


def _llm(folder, async_scheduling, **kw):
    kw.setdefault("num_kv_blocks", 256)
    return LLM(folder, device="cpu", block_size=4, async_scheduling=async_scheduling, **kw)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _run(folder, async_scheduling, prompts, params, **kw):
    llm = _llm(folder, async_scheduling, **kw)
    assert llm.engine.async_scheduling is async_scheduling
    outs = llm.generate(_ids(prompts), params)
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_blocks_used == 0  # nothing leaked by blind steps or drops
    return outs


def test_first_step_is_in_flight(llama_folder):
    llm = _llm(llama_folder, True)
    llm.engine.add_request(random_prompts([9], seed=1)[0], SamplingParams(temperature=0.0, max_tokens=3))
    assert llm.engine.step() == []  # the prompt's token is still on its way
    assert llm.engine._inflight is not None
    req = llm.engine.scheduler.running[0]
    assert req.num_output_placeholders == 1 and req.num_output_tokens == 0
    out = llm.engine.step()  # launches the first decode, then processes the prompt step
    assert out[0].outputs[0].token_ids and req.num_output_placeholders == 1


@pytest.mark.parametrize("budget", [2048, 24])  # 24: prompts in chunks, mixed with decodes
def test_greedy_tokens_equal_sync(llama_folder, budget):
    prompts = random_prompts([37, 3, 120, 9, 64, 1, 50], seed=21)
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (20, 1, 7, 33, 12, 2, 16)]
    sync = _run(llama_folder, False, prompts, params, max_num_batched_tokens=budget)
    asyn = _run(llama_folder, True, prompts, params, max_num_batched_tokens=budget)
    assert [o.outputs[0].token_ids for o in asyn] == [o.outputs[0].token_ids for o in sync]
    assert [o.outputs[0].finish_reason for o in asyn] == [o.outputs[0].finish_reason for o in sync]


def test_stop_tokens_found_one_step_late(llama_folder):
    """A request that stops is scheduled once more before the host knows; that token is dropped."""
    prompts = random_prompts([11, 29, 6], seed=5)
    free = _run(llama_folder, False, prompts, SamplingParams(temperature=0.0, max_tokens=24))
    stops = [o.outputs[0].token_ids[k] for o, k in zip(free, (3, 9, 0))]
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[t]) for t in stops]
    sync = _run(llama_folder, False, prompts, params)
    asyn = _run(llama_folder, True, prompts, params)
    for a, s, t in zip(asyn, sync, stops):
        assert a.outputs[0].token_ids == s.outputs[0].token_ids
        assert a.outputs[0].token_ids[-1] == t and a.outputs[0].finish_reason == "stop"


def test_preemption_and_prefix_cache(llama_folder):
    prefix = random_prompts([24], seed=8)[0]
    prompts = [prefix + t for t in random_prompts([5, 9, 2, 13], seed=9)]
    params = SamplingParams(temperature=0.0, max_tokens=30)
    ref = _run(llama_folder, False, prompts, params, num_kv_blocks=512)
    llm = _llm(llama_folder, True, num_kv_blocks=40)  # far too few blocks for all four at once
    outs = llm.generate(_ids(prompts), params)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def test_abort_with_a_step_in_flight(llama_folder):
    prompts = random_prompts([15, 21, 8], seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    ref = _run(llama_folder, False, prompts, params)
    llm = _llm(llama_folder, True)
    eng = llm.engine
    rids = [eng.add_request(p, params) for p in prompts]
    for _ in range(5):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request(rids[1])
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != rids[1]
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {rids[0]: ref[0].outputs[0].token_ids, rids[2]: ref[2].outputs[0].token_ids}
    assert eng.stats().kv_blocks_used == 0


@pytest.mark.parametrize("seeded", [True, False])
def test_sampled_requests_launch_and_equal_sync(llama_folder, seeded):
    """Sampled requests (temperature, top-p, top-k, min-p; logprobs) among greedy ones launch
    asynchronously too (drawn on the device); with the same seeds every token and logprob
    equals the synchronous engine's. Unseeded requests get seeds from the engine's seed, so
    two engines with the same seed agree as well."""
    prompts = random_prompts([12, 30, 7, 19], seed=17)
    seed = {"seed": 3} if seeded else {}
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, **seed),
        SamplingParams(temperature=0.0, max_tokens=20, logprobs=2),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.05, max_tokens=14, logprobs=3, **seed),
    ]
    sync = _run(llama_folder, False, prompts, params)
    llm = _llm(llama_folder, True)
    steps = []
    launch = llm.engine.executor.launch
    llm.engine.executor.launch = lambda sched: (steps.append(len(sched.scheduled)), launch(sched))[1]
    asyn = llm.generate(_ids(prompts), params)
    assert len(steps) > 10  # the sampled rows did not force synchronous steps
    assert [o.outputs[0].token_ids for o in asyn] == [o.outputs[0].token_ids for o in sync]
    for a, s in zip(asyn, sync):
        assert a.outputs[0].logprobs == s.outputs[0].logprobs
    assert len(asyn[3].outputs[0].logprobs[0]) == 4  # the chosen token and its 3 alternatives
    assert asyn[1].outputs[0].token_ids != _run(llama_folder, False, prompts[1:2], params[0])[0].outputs[0].token_ids


def test_default_is_off_on_cpu(llama_folder):
    assert _llm(llama_folder, None).engine.async_scheduling is False


def _count_split_launches(llm) -> list[int]:
    halves = []
    launch_forward = llm.engine.executor.launch_forward
    llm.engine.executor.launch_forward = lambda sched: (halves.append(1), launch_forward(sched))[1]
    return halves


def _record_in_flight(monkeypatch) -> list[int | None]:
    """Per edit: how many in-flight tokens the editor was given (None: every token on the host)."""
    seen = []
    editor_apply = LogitsEditor.apply

    def apply(self, logits, reqs, in_flight=None):
        seen.append(None if in_flight is None else len(in_flight[1]))
        return editor_apply(self, logits, reqs, in_flight)

    monkeypatch.setattr(LogitsEditor, "apply", apply)
    return seen


def test_edited_logits_launch_in_halves_and_equal_sync(llama_folder, monkeypatch):
    """Penalties, biases, allowed ids and min_tokens launch asynchronously in halves (forward,
    edits, draw): the penalties count the in-flight step's tokens on the device, so the edits go
    in before the previous step is processed. Tokens and logprobs equal the synchronous
    engine's, greedy and seeded."""
    prompts = random_prompts([12, 30, 7, 19, 9], seed=23)
    early = _run(llama_folder, False, prompts[3:4], SamplingParams(temperature=0.0, max_tokens=4))[0]
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=16, presence_penalty=0.5,
                       frequency_penalty=0.7, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, logit_bias={5: 2.5, 9: -3.0}, allowed_token_ids=list(range(3, 120))),
        # min_tokens masks the stop token the model emits second until 6 tokens exist
        SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, stop_token_ids=[early.outputs[0].token_ids[1]]),
        SamplingParams(temperature=0.0, max_tokens=10),
    ]
    sync = _run(llama_folder, False, prompts, params)
    llm = _llm(llama_folder, True)
    halves = _count_split_launches(llm)
    in_flight = _record_in_flight(monkeypatch)
    asyn = llm.generate(_ids(prompts), params)
    assert len(halves) > 10  # the edited rows did not force synchronous steps
    assert None not in in_flight and max(in_flight) == len(prompts)  # none waited for the host
    assert [o.outputs[0].token_ids for o in asyn] == [o.outputs[0].token_ids for o in sync]
    assert [o.outputs[0].finish_reason for o in asyn] == [o.outputs[0].finish_reason for o in sync]
    assert asyn[1].outputs[0].logprobs == sync[1].outputs[0].logprobs
    assert len(asyn[3].outputs[0].token_ids) >= 6
    assert llm.engine.stats().kv_blocks_used == 0


def test_grammar_masks_launch_in_halves_and_stop_one_step_late(tiny_text_model, monkeypatch):
    """Structured outputs under async scheduling: a grammar that completes stops its request at
    the drain while its next row is already launched; that row is left unedited (no mask from
    a finished grammar) and dropped, and every output equals the synchronous engine's."""
    import fapool.layers.logits_processors as lp
    from fapool.sampling_params import StructuredOutputs

    stopped = []
    in_flight = _record_in_flight(monkeypatch)
    mask = lp.apply_grammar_masks
    monkeypatch.setattr(
        lp, "apply_grammar_masks", lambda x, rows, ms: (stopped.extend(m.is_stopped() for m in ms), mask(x, rows, ms))[1]
    )

    params = [
        SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputs(choice=["red", "green", "blue"])),
        SamplingParams(temperature=0.8, seed=5, max_tokens=12, structured_outputs=StructuredOutputs(regex=r"[0-9]{2}-[a-c]{3}")),
        SamplingParams(temperature=0.0, max_tokens=12, bad_words=["a"]),
        SamplingParams(temperature=0.0, max_tokens=9),
    ]
    prompts = ["Colour:", "Code:", "Say", "Hello"]

    def run(async_scheduling):
        llm = LLM(tiny_text_model, device="cpu", block_size=4, num_kv_blocks=256, async_scheduling=async_scheduling)
        halves = _count_split_launches(llm) if async_scheduling else []
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return outs, halves

    sync, _ = run(False)
    asyn, halves = run(True)
    assert len(halves) > 5
    assert set(in_flight) == {None}  # a grammar reads its latest token: the host has every one first
    assert stopped and not any(stopped)
    assert [o.token_ids for o in asyn] == [o.token_ids for o in sync]
    assert asyn[0].text in {"red", "green", "blue"} and asyn[0].finish_reason == "stop"
    import re

    assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", asyn[1].text)
    assert "a" not in asyn[2].text
