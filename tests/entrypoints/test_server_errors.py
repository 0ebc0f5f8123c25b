"""Errors leave in OpenAI's shape with the right status: 400 bad input (naming the field),
401 API key, 404 unknown model or path, and the openai client maps them to its exceptions."""

import json
import socket
import time

import httpx
import openai
import pytest
from server_helpers import start_server, tiny_engine_args

from fapool.entrypoints.llm import build_engine

KEY = "sk-test-key"
MAX_LEN = 128
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


def NAMED(name):  # noqa: N802 - reads as the value it builds
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def server(tiny_text_model):
    srv = start_server(build_engine(tiny_engine_args(tiny_text_model, max_model_len=MAX_LEN)), api_key=KEY)
    yield srv
    srv.stop()


def _post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=30, **kw)


def _error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 2}
    assert _error(_post(server, "/v1/completions", body, key=None), 401)["code"] == "invalid_api_key"
    _error(_post(server, "/v1/completions", body, key="wrong"), 401)
    _error(httpx.get(f"{server.base_url}/v1/models"), 401)
    assert _post(server, "/v1/completions", body).status_code == 200
    # Probes stay open, as in vLLM.
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -2}, "top_k"),
        ({"prompt": "hi", "min_p": 2}, "min_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "seed": 2**70}, "seed"),
        ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        # Structured outputs: one constraint, well formed.
        ({"prompt": "hi", "guided_choice": ["a"], "guided_regex": "a+"}, "guided_choice"),
        ({"prompt": "hi", "guided_choice": []}, "structured_outputs"),
        ({"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format.type"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),  # strict types: no coercion
        ({"prompt": [[False]]}, "prompt"),
        ({"prompt": "hi", "n": True}, "n"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, 2, 999]}, "prompt"),
        ({"prompt": [[1, 2], "mixed"]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x" * MAX_LEN}, "prompt"),
        ({"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens"),
    ],
)
def test_completion_bad_input_400(server, body, param):
    _error(_post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_LEN}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": NAMED("other")}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": "required",
             "guided_regex": "a+"},
            "tool_choice",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, "continue_final_message"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}],
                "continue_final_message": True,
                "add_generation_prompt": False,
            },
            "continue_final_message",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}, "temperature"),
    ],
)
def test_chat_bad_input_400(server, body, param):
    _error(_post(server, "/v1/chat/completions", body), 400, param)


def test_malformed_bodies_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for content in (b"{not json", b"[1, 2]", b"", b'"a string"', b'{"prompt": NaN}'):
        r = httpx.post(f"{server.base_url}/v1/completions", content=content, headers=headers)
        _error(r, 400)


def test_unknown_model_and_path_404(server):
    err = _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model")
    assert err["code"] == "model_not_found"
    _error(
        _post(
            server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
    )
    _error(httpx.get(f"{server.base_url}/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _error(httpx.get(f"{server.base_url}/v1/nowhere"), 401)  # the key is checked before routing
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10 * MAX_LEN)


def test_kv_capacity_400(tiny_text_model):
    """A request whose KV cannot fit the whole cache is refused by the engine with a reason."""
    srv = start_server(build_engine(tiny_engine_args(tiny_text_model, num_kv_blocks=4, block_size=4)))
    try:
        r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": [5] * 10, "max_tokens": 20})
        assert "KV blocks" in _error(r, 400)["message"]
    finally:
        srv.stop()


def test_tiny_temperature_is_greedy(server):
    """Temperatures that would overflow the logits (1e-30) are treated as greedy, as in vLLM."""
    body = {"prompt": [3, 4, 5], "max_tokens": 6, "return_token_ids": True}
    greedy = _post(server, "/v1/completions", {**body, "temperature": 0}).json()
    tiny = _post(server, "/v1/completions", {**body, "temperature": 1e-30})
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


def test_penalties_biases_and_masks_change_the_output(server):
    """The logits edits are applied, not ignored: a +100 bias makes one token every choice, an
    allowed set bounds the choices, min_tokens outlasts an early stop."""
    base = {"prompt": "hi", "max_tokens": 6, "temperature": 0, "return_token_ids": True}

    def ids(**kw) -> list[int]:
        r = _post(server, "/v1/completions", {**base, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    free = ids()
    assert set(ids(logit_bias={"7": 100})) == {7}
    assert set(ids(allowed_token_ids=[5, 9])) <= {5, 9}
    assert ids(stop_token_ids=[free[0]]) == [free[0]]
    assert len(ids(stop_token_ids=[free[0]], min_tokens=4)) >= 4
    assert ids(frequency_penalty=2, presence_penalty=2, repetition_penalty=1.3, max_tokens=6)  # accepted


def _announce_body(base_url: str, length: int, headers: dict) -> tuple[int, dict]:
    """POST /v1/completions with `Content-Length: length` and send none of the body; returns
    the status and JSON of the answer."""
    host, port = base_url.split("//")[1].split(":")
    lines = ["POST /v1/completions HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload)


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_oversized_and_unauthenticated_bodies_are_refused_before_reading(tiny_text_model):
    """413 from Content-Length alone, and 401 before any body is read (an invalid 20 MB body
    without a key is 401, not 400); a body streamed without a length stops at the limit."""
    srv = start_server(build_engine(tiny_engine_args(tiny_text_model)), api_key=KEY, max_request_bytes=1 << 20)
    try:
        url = f"{srv.base_url}/v1/completions"
        # Headers announcing 20 MB and no body at all: the answer cannot have read one. (A client
        # still uploading when the server closes may see the reset instead of the answer.)
        status, body = _announce_body(srv.base_url, 20 << 20, {})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        status, body = _announce_body(srv.base_url, 20 << 20, auth)
        assert status == 413 and body["error"]["code"] == "request_too_large"

        def chunks():
            for _ in range(64):
                yield b"x" * (64 << 10)

        assert _error(httpx.post(url, content=chunks(), headers=auth), 413)["code"] == "request_too_large"
        ok = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers=auth, timeout=30)
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
    finally:
        srv.stop()


def test_tokenize_detokenize_models_version_and_head_health(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hello world"}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == MAX_LEN
    r = httpx.post(f"{server.base_url}/detokenize", json={"tokens": body["tokens"]}, headers=auth)
    assert r.status_code == 200 and "hello world" in r.json()["prompt"]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{server.base_url}/tokenize", json=chat, headers=auth).json()["count"] > 0
    _error(httpx.post(f"{server.base_url}/tokenize", json={}, headers=auth), 400, "prompt")
    _error(httpx.post(f"{server.base_url}/tokenize", json={"messages": []}, headers=auth), 400, "messages")
    _error(httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**9]}, headers=auth), 400, "tokens")
    models = httpx.get(f"{server.base_url}/v1/models", headers=auth).json()["data"]
    card = httpx.get(f"{server.base_url}/v1/models/{models[0]['id']}", headers=auth)
    assert card.status_code == 200 and card.json()["id"] == models[0]["id"]
    _error(httpx.get(f"{server.base_url}/v1/models/gpt-9", headers=auth), 404, "model")
    assert httpx.get(f"{server.base_url}/version").json()["version"]
    head = httpx.head(f"{server.base_url}/health")
    assert head.status_code == 200 and head.content == b""


def test_echo_truncation_and_chat_template_options(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    base = {"max_tokens": 3, "temperature": 0, "return_token_ids": True}
    r = _post(server, "/v1/completions", {"prompt": "hello there", "echo": True, **base})
    plain = _post(server, "/v1/completions", {"prompt": "hello there", **base}).json()["choices"][0]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello there" + plain["text"]
    long = list(range(5, 45))
    r = _post(server, "/v1/completions", {"prompt": long, "truncate_prompt_tokens": 8, **base}).json()
    assert r["usage"]["prompt_tokens"] == 8 and r["choices"][0]["prompt_token_ids"] == long[-8:]
    chat = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 3,
    }
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=chat, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"messages": chat["messages"], "add_generation_prompt": False}, headers=auth).json()
    assert r.json()["usage"]["prompt_tokens"] < tokens["count"]  # the final message is continued, not closed


def test_an_overlong_text_prompt_is_refused_before_tokenizing(server):
    """A prompt with more characters than max_model_len tokens can spell is a 400 at once: the
    tokenizer is never called on it."""
    from unittest import mock

    auth = {"Authorization": f"Bearer {KEY}"}
    huge = "word " * 400_000  # 2 MB, under the body limit
    tokenizer = type(server.app.state.engine.engine.tokenizer)
    with mock.patch.object(tokenizer, "encode", side_effect=AssertionError("tokenized")):
        r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": huge}, headers=auth, timeout=30)
        err = _error(r, 400, "prompt")
        assert "characters" in err["message"]
        chat = {"messages": [{"role": "user", "content": huge}]}
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=chat, headers=auth, timeout=30)
        _error(r, 400, "messages")


def test_structured_outputs_constrain_the_text(server):
    """Every form of constraint is applied: the text is one of the choices, matches the regex,
    or parses as JSON valid for the schema; a constraint that does not compile is a 400."""
    import json
    import re

    auth = {"Authorization": f"Bearer {KEY}"}

    def text(path="/v1/completions", **kw) -> str:
        body = {"prompt": "Answer:", "max_tokens": 40, "temperature": 1.0, "seed": 3, **kw}
        if path.endswith("chat/completions"):
            body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{server.base_url}{path}", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]

    assert text(guided_choice=["red", "green", "blue"]) in {"red", "green", "blue"}
    # n = 2: the siblings forked at the prompt's end each carry their own copy of the grammar.
    r = _post(server, "/v1/completions", {"prompt": "Answer:", "n": 2, "max_tokens": 8, "guided_choice": ["ab", "cd"]})
    assert r.status_code == 200 and {c["text"] for c in r.json()["choices"]} <= {"ab", "cd"}
    assert text(structured_outputs={"choice": ["up", "down"]}) in {"up", "down"}
    assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", text(guided_regex=r"[0-9]{2}-[a-c]{3}"))
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    for kw in (
        {"guided_json": schema},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
    ):
        value = json.loads(text(max_tokens=120, **kw))
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)
    small = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": small}}
    chat = json.loads(text("/v1/chat/completions", max_tokens=100, response_format=fmt))
    assert set(chat) == {"n"} and isinstance(chat["n"], int)
    # Any JSON object: a random model may not close it within the budget, but it opens one.
    assert text(response_format={"type": "json_object"}).lstrip().startswith("{")
    r = _post(server, "/v1/completions", {"prompt": "x", "guided_regex": "("})
    assert "invalid structured output constraint" in _error(r, 400)["message"]


def test_health_answers_while_a_prompt_is_tokenized(server, monkeypatch):
    """Tokenizing runs off the event loop: with a tokenizer that takes 2 s, /health still answers
    at once and the request then completes."""
    import threading

    tokenizer = server.app.state.engine.engine.tokenizer
    encode = tokenizer.encode
    started = threading.Event()

    def slow_encode(*args, **kwargs):
        started.set()
        time.sleep(2.0)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(r=_post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2}))
    )
    worker.start()
    assert started.wait(10)
    t = time.monotonic()
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert time.monotonic() - t < 0.5
    assert worker.is_alive()  # still tokenizing
    worker.join(30)
    assert result["r"].status_code == 200, result["r"].text


def test_tool_calls(server):
    """A named tool_choice makes the output that function's arguments (valid for its schema);
    "required" makes it one or more calls of the tools; earlier calls and tool results are
    accepted in the messages."""
    import json

    auth = {"Authorization": f"Bearer {KEY}"}
    history = [  # short: the byte-level test model has 128 positions
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sun"},
    ]

    def chat(**kw):
        body = {"messages": history, "tools": [WEATHER, TIME], "max_tokens": 70, "temperature": 0, **kw}
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    named = chat(tool_choice=NAMED("get_weather"))
    (call,) = named["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and named["message"]["content"] is None
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert named["finish_reason"] == "stop"

    required = chat(tool_choice="required")
    calls = required["message"]["tool_calls"]
    assert calls and required["finish_reason"] == "tool_calls"
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert c["function"]["name"] in ("get_weather", "get_time")
        assert set(args) == ({"city"} if c["function"]["name"] == "get_weather" else {"utc"})

    none = chat(tool_choice="none", max_tokens=4)
    assert "tool_calls" not in none["message"]

    # Streamed, the deltas assemble into the same calls.
    for choice, whole in ((NAMED("get_weather"), named), ("required", required)):
        body = {"messages": history, "tools": [WEATHER, TIME], "max_tokens": 70, "temperature": 0,
                "tool_choice": choice, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assembled: dict[int, dict] = {}
        for ch in chunks:
            for d in ch["choices"][0]["delta"].get("tool_calls", []):
                call = assembled.setdefault(d["index"], {"name": None, "arguments": ""})
                call["name"] = d.get("function", {}).get("name") or call["name"]
                call["arguments"] += d["function"].get("arguments", "")
        want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]]
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(assembled.items())] == want
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
