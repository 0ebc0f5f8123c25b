"""The official openai client against a live server: completions and chat, streaming and not,
with greedy output equal to LLM.generate / LLM.chat for the same prompt."""

import httpx
import openai
import pytest
from server_helpers import start_server, tiny_engine_args
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.entrypoints.llm import build_engine
from fapool.entrypoints.openai_serving import held_back

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three primary colours."}]
SMOL_TOKENS = 12


@pytest.fixture(scope="module")
def smol(smollm2_llm):
    """Expected outputs from LLM first; then the same engine behind a server (the engine is
    single-threaded: the server's engine thread owns it until the server stops)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=SMOL_TOKENS)
    expected = {
        "completion": smollm2_llm.generate(PROMPT, greedy)[0],
        "chat": smollm2_llm.chat(MESSAGES, greedy)[0],
    }
    server = start_server(smollm2_llm.engine, name="smollm2")
    yield server, expected
    server.stop()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    folder = tiny_checkpoints["llama"][0]
    server = start_server(build_engine(tiny_engine_args(folder)), name="tiny")
    yield server, folder
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_smollm2_completion_matches_llm(smol):
    server, expected = smol
    client = _client(server)
    want = expected["completion"]
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=SMOL_TOKENS, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)

    chunks = list(
        client.completions.create(
            model="smollm2", prompt=PROMPT, max_tokens=SMOL_TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)  # usage in the final chunk


def test_smollm2_chat_matches_llm(smol):
    server, expected = smol
    client = _client(server)
    want = expected["chat"]
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=SMOL_TOKENS, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)

    stream = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=SMOL_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_models_health_metrics(smol):
    server, _ = smol
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        "fapool_request_finished_total",
        "fapool_time_to_first_token_seconds_bucket",
        "fapool_time_per_output_token_seconds",
        "fapool_inter_token_latency_seconds",
        "fapool_request_queue_time_seconds",
        "fapool_e2e_request_latency_seconds",
        "fapool_num_requests_running",
        "fapool_num_requests_waiting",
        "fapool_kv_cache_usage_ratio",
        "fapool_num_preemptions_total",
        "fapool_attention_pool_size",
    ):
        assert name in text, name


def test_token_id_prompts_match_llm(tiny):
    """A batch of token-id prompts, n = 2 greedy, streaming and not, against LLM.generate."""
    server, folder = tiny
    prompts = random_prompts([5, 17, 9], seed=21)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=256)
    want = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)]

    client = _client(server)
    r = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=10, temperature=0, n=2, extra_body={"return_token_ids": True}
    )
    got = {c.index: c.token_ids for c in r.choices}
    assert [got[2 * i] for i in range(3)] == want and [got[2 * i + 1] for i in range(3)] == want
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 60

    stream = client.completions.create(
        model="tiny",
        prompt=prompts,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    streamed: dict[int, list[int]] = {}
    for chunk in stream:
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
    assert [streamed[i] for i in range(3)] == want


def test_logprobs_and_seed(tiny):
    server, _ = tiny
    client = _client(server)
    prompt = random_prompts([6], seed=3)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(t.startswith("token_id:") for t in lp.tokens)  # no tokenizer: ids, as vLLM does
    assert all(
        len(top) >= 3 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    seeded = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "extra_body": {"return_token_ids": True, "top_k": 50, "min_p": 0.01},
    }
    a, b = client.completions.create(**seeded), client.completions.create(**seeded)
    assert a.choices[0].token_ids == b.choices[0].token_ids


def test_prompt_logprobs(tiny):
    """vLLM's prompt_logprobs: None for the first token, then each prompt token's logprob (the
    largest of its entry when it is the top choice) with the alternatives asked for."""
    server, _ = tiny
    client = _client(server)
    prompt = random_prompts([9], seed=4)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    for token, entry in zip(prompt[1:], plp[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 for v in entry.values())


def test_echo_with_logprobs_reports_the_prompt_tokens_first(tiny):
    """OpenAI's legacy echo + logprobs: the prompt's tokens (the first without a logprob) then
    the completion's, the prompt's values equal to prompt_logprobs."""
    server, _ = tiny
    client = _client(server)
    prompt = random_prompts([7], seed=5)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset)
    plp = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2}
    ).choices[0].model_extra["prompt_logprobs"]
    for p in range(1, len(prompt)):
        assert lp.token_logprobs[p] == pytest.approx(plp[p][str(prompt[p])]["logprob"], abs=1e-5)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    assert lp.token_logprobs[len(prompt):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_held_back():
    assert held_back("abc</", ("</s>",)) == 2 and held_back("abc", ("</s>",)) == 0
    assert held_back("ab\n", ("\n\n", "b\nx")) == 2


def test_stop_string_streamed_like_full(tiny_text_model):
    """A stop string spanning several tokens: the stream never shows text the engine later
    cuts, and the streamed text equals the non-streamed one."""
    server = start_server(build_engine(tiny_engine_args(tiny_text_model)))
    try:
        client = _client(server)
        base = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
        text = client.completions.create(**base).choices[0].text
        start = next(i for i in range(5, len(text) - 3) if "\ufffd" not in text[i : i + 3])
        stop = text[start : start + 3]
        want = text[: text.find(stop)]
        full = client.completions.create(**base, stop=[stop]).choices[0]
        assert (full.text, full.finish_reason, full.stop_reason) == (want, "stop", stop)
        chunks = list(client.completions.create(**base, stop=[stop], stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert all(stop not in c.choices[0].text for c in chunks if c.choices)
    finally:
        server.stop()
