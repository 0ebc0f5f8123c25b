"""The server under pressure: overload (429, nothing lost), client disconnects (KV freed), KV
exhaustion (preemption, all finish), a failing request (the others go on), graceful shutdown."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from server_helpers import engine_stats, metric, slow_down, start_server, tiny_engine_args, wait_until
from tiny_models import random_prompts

from fapool import LLM, SamplingParams
from fapool.entrypoints.llm import build_engine


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]


def _expected(folder, prompts, max_tokens, **engine_kw):
    llm = LLM(folder, device="cpu", block_size=4, num_kv_blocks=256, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


async def _burst(base_url, prompts, max_tokens, stream=False):
    """All prompts at once; returns (status, token ids or error body) per prompt."""

    async def one(client, prompt):
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
            "stream": stream,
        }
        if not stream:
            r = await client.post(f"{base_url}/v1/completions", json=body)
            data = r.json()
            return r.status_code, data["choices"][0]["token_ids"] if r.status_code == 200 else data
        tokens = []
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(await r.aread())
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:]).get("choices", []):
                        tokens += c["token_ids"]
        return 200, tokens

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=90)


@pytest.mark.parametrize("stream", [False, True])
def test_overload_429_none_lost(folder, stream):
    prompts = random_prompts([6 + i % 5 for i in range(16)], seed=40)
    want = _expected(folder, prompts, 12)
    engine = build_engine(tiny_engine_args(folder, max_num_seqs=2))
    slow_down(engine, 0.004)
    srv = start_server(engine, max_waiting=3)
    try:
        results = asyncio.run(_burst(srv.base_url, prompts, 12, stream))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 3
        for (status, got), expected in zip(results, want):
            if status == 200:
                assert got == expected  # a completed request is a correct one
            else:
                assert got["error"]["type"] == "rate_limit_error"
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
        stats = engine_stats(srv)
        assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
        assert srv.app.state.engine.num_waiting == 0
        assert metric(srv, "fapool_request_rejected_total", reason="overloaded") == statuses.count(429)
        assert metric(srv, "fapool_request_finished_total", finish_reason="length") == statuses.count(200)
    finally:
        srv.stop()


def test_disconnect_frees_blocks(folder):
    engine = build_engine(tiny_engine_args(folder))
    slow_down(engine, 0.01)
    srv = start_server(engine)
    try:
        body = {"prompt": list(range(3, 40)), "max_tokens": 500, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert engine_stats(srv).kv_blocks_used > 0
        # Leaving the block closed the connection mid-stream.
        assert wait_until(lambda: engine_stats(srv).kv_blocks_used == 0, 10)
        assert engine_stats(srv).num_running == 0
        assert metric(srv, "fapool_request_finished_total", finish_reason="abort") == 1

        # A non-streaming client that gives up (timeout) is noticed too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.base_url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
        assert wait_until(
            lambda: engine_stats(srv).kv_blocks_used == 0 and engine_stats(srv).num_running == 0, 10
        )
        assert metric(srv, "fapool_request_finished_total", finish_reason="abort") == 2
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
    finally:
        srv.stop()


def test_kv_exhaustion_preempts_and_finishes(folder):
    """24 blocks of 4 tokens: each request (<= 71 tokens) fits alone, the batch does not."""
    prompts = random_prompts([30, 25, 41, 18, 33, 27], seed=5)
    want = _expected(folder, prompts, 30, enable_prefix_caching=False)
    engine = build_engine(tiny_engine_args(folder, num_kv_blocks=24, enable_prefix_caching=False))
    slow_down(engine, 0.002)
    srv = start_server(engine)
    try:
        results = asyncio.run(_burst(srv.base_url, prompts, 30, stream=True))
        assert [r for r in results] == [(200, w) for w in want]
        stats = engine_stats(srv)
        assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0
        assert metric(srv, "fapool_num_preemptions_total") == stats.num_preemptions
    finally:
        srv.stop()


def test_failing_request_does_not_take_down_others(folder):
    prompts = random_prompts([7, 9, 11], seed=8)
    want = _expected(folder, prompts, 8)
    engine = build_engine(tiny_engine_args(folder))
    add = engine.add_request

    def add_request(prompt, *args, **kw):  # the engine chokes on one particular prompt
        if prompt[0] == 250:
            raise RuntimeError("poisoned prompt")
        return add(prompt, *args, **kw)

    engine.add_request = add_request
    execute, poisoned = engine.executor.runner.execute, threading.Event()

    def flaky_execute(*args, **kw):  # ... and one step of the model fails
        if poisoned.is_set():
            poisoned.clear()
            raise RuntimeError("injected step failure")
        return execute(*args, **kw)

    engine.executor.runner.execute = flaky_execute
    srv = start_server(engine)
    try:
        results = asyncio.run(_burst(srv.base_url, [[250, 1, 2], *prompts], 8))
        assert results[0][0] == 500 and "poisoned" in results[0][1]["error"]["message"]
        assert results[1:] == [(200, w) for w in want]

        poisoned.set()
        r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": prompts[0], "max_tokens": 8})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        # The loop survived: later requests are served, and nothing leaked.
        assert asyncio.run(_burst(srv.base_url, prompts, 8, stream=True)) == [(200, w) for w in want]
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
        assert engine_stats(srv).kv_blocks_used == 0
    finally:
        srv.stop()


def test_graceful_shutdown(folder):
    """At shutdown a short request still finishes; one that cannot finish in the drain time is
    failed cleanly (an error event, then [DONE]); the engine is left empty."""
    engine = build_engine(tiny_engine_args(folder))
    slow_down(engine, 0.01)
    srv = start_server(engine, shutdown_timeout_s=1.0)
    out: dict = {}

    def long_stream():
        body = {"prompt": [5, 6, 7], "max_tokens": 900, "stream": True}
        with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=30) as r:
            out["long"] = [line for line in r.iter_lines() if line]

    def short_request():
        body = {"prompt": [8, 9], "max_tokens": 40, "return_token_ids": True}
        out["short"] = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=30)

    threads = [threading.Thread(target=long_stream), threading.Thread(target=short_request)]
    for t in threads:
        t.start()
    assert wait_until(lambda: engine_stats(srv).num_running == 2, 10)
    t0 = time.monotonic()
    srv.server.should_exit = True  # what SIGTERM does; stop() below joins
    # While it drains, the server still listens: a new request is refused with 503, not a
    # refused connection.
    refused = None
    while refused is None and time.monotonic() - t0 < 5:
        try:
            r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": [3], "max_tokens": 2}, timeout=5)
            if r.status_code == 503:
                refused = r
        except httpx.ConnectError:
            break
    assert refused is not None and refused.json()["error"]["type"] == "service_unavailable"
    srv.stop()
    for t in threads:
        t.join(30)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 10
    assert out["short"].status_code == 200 and len(out["short"].json()["choices"][0]["token_ids"]) == 40
    assert out["long"][-1] == "data: [DONE]"
    error = json.loads(out["long"][-2][6:])["error"]
    assert error["type"] == "service_unavailable" and "shut down" in error["message"]
    # The engine thread has stopped; the engine is ours again.
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0


def test_serves_attention_pool(folder):
    """The server drives a pooled engine (worker processes) like any other: greedy tokens equal
    the single-process engine's, KV is freed, and the workers stop with the engine."""
    prompts = random_prompts([10, 40, 25], seed=12)
    want = _expected(folder, prompts, 30, enable_prefix_caching=False)
    pool = {"attention_workers": 2, "pool_threshold": 32, "tokens_per_pool_worker": 16}
    # Prefix caching off: with it on, the pool currently differs from the single-process engine
    # for a prompt whose prefix is cached (an engine issue, reported separately).
    engine = build_engine(tiny_engine_args(folder, enable_prefix_caching=False, **pool))
    try:
        srv = start_server(engine)
        try:
            assert asyncio.run(_burst(srv.base_url, prompts, 30, stream=True)) == [(200, w) for w in want]
            assert engine_stats(srv).kv_blocks_used == 0
            assert "fapool_attention_pool_size" in httpx.get(f"{srv.base_url}/metrics").text
            assert engine_stats(srv).pool_live_workers == 2
        finally:
            srv.stop()
    finally:
        engine.shutdown()
