"""Parsing a finished output into tool calls (fapool.entrypoints.tool_calls)."""

import json

from fapool.entrypoints.tool_calls import constraint, parse

TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "mul"}},
]


def test_auto_takes_hermes_blocks_of_known_tools_and_keeps_the_rest():
    text = (
        'Let me compute. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "div", "arguments": {}}</tool_call> <tool_call>{"name": "mul", "argu'
    )
    content, calls = parse(text, TOOLS, "auto")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert content.startswith("Let me compute.") and "div" in content and "</tool_call>" in content


def test_auto_without_calls_is_plain_content():
    assert parse("just text", TOOLS, "auto") == ("just text", [])
    assert parse('<tool_call>{"name": "add"}</tool_call>', TOOLS, "none")[1] == []


def test_named_and_required_read_the_constrained_json():
    named = {"type": "function", "function": {"name": "add"}}
    assert parse('{ "a": 1 }', TOOLS, named)[1][0].arguments == '{"a":1}'
    content, calls = parse('[{"name": "mul", "arguments": {"x": 3}}]', TOOLS, "required")
    assert content is None and [(c.name, c.arguments) for c in calls] == [("mul", '{"x": 3}')]
    assert parse('[{"name": "mul", "argum', TOOLS, "required") == ('[{"name": "mul", "argum', [])  # cut short


def test_constraints():
    assert constraint(TOOLS, "auto") is None and constraint(TOOLS, "none") is None
    schema = json.loads(constraint(TOOLS, "required").json)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = json.loads(constraint(TOOLS, {"type": "function", "function": {"name": "mul"}}).json)
    assert named["type"] == "object" and named["x-guidance"] == {"whitespace_flexible": False}


def _stream(text_steps, choice, finish="stop"):
    """Chat stream chunks for an output that grows through `text_steps` (the last finishes)."""
    from fapool.entrypoints.openai_protocol import ChatCompletionRequest
    from fapool.entrypoints.openai_serving import ChatRenderer
    from fapool.outputs import CompletionOutput, RequestMetrics, RequestOutput

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=True, tools=TOOLS,
                                tool_choice=choice)
    renderer = ChatRenderer("r", "m", req, [[1, 2]], None)
    chunks = []
    for k, text in enumerate(text_steps):
        done = k == len(text_steps) - 1
        c = CompletionOutput(0, text, list(range(k + 1)), finish if done else None)
        chunks += renderer.chunks(0, RequestOutput("r", None, [1, 2], [c], done, RequestMetrics(0.0)))
    return [ch["choices"][0] for ch in chunks]


def _calls(choices):
    """The calls a client assembles from the deltas (arguments concatenated per index)."""
    calls: dict[int, dict] = {}
    for ch in choices:
        for d in ch["delta"].get("tool_calls", []):
            call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            call["name"] = d.get("function", {}).get("name") or call["name"]
            call["arguments"] += d["function"].get("arguments", "")
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_streamed_auto_sends_text_before_a_call_then_the_call():
    steps = ["Let me", "Let me compute. <tool_", 'Let me compute. <tool_call>{"name": "add", "arg',
             'Let me compute. <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>']
    choices = _stream(steps, "auto")
    content = "".join(ch["delta"].get("content", "") for ch in choices)
    assert content.strip() == "Let me compute."  # nothing of the call leaked as text
    assert "<" not in content
    assert _calls(choices) == [("add", {"a": 1})]
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_streamed_auto_without_a_call_is_the_whole_text():
    choices = _stream(["a <tool", "a <tool> b"], "auto")
    assert "".join(ch["delta"].get("content", "") for ch in choices) == "a <tool> b"
    assert choices[-1]["finish_reason"] == "stop" and _calls(choices) == []


def test_streamed_named_call_streams_its_arguments():
    named = {"type": "function", "function": {"name": "mul"}}
    choices = _stream(['{"x"', '{"x":', '{"x":3}'], named)
    first = choices[0]["delta"]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"]["name"] == "mul" and first["type"] == "function"
    assert sum("id" in d for ch in choices for d in ch["delta"].get("tool_calls", [])) == 1
    assert _calls(choices) == [("mul", {"x": 3})]
    assert choices[-1]["finish_reason"] == "stop"


def test_streamed_required_sends_the_calls_when_finished():
    choices = _stream(['[{"name": "mul", ', '[{"name": "mul", "arguments": {"x": 3}}]'], "required")
    assert all("content" not in ch["delta"] for ch in choices)
    assert _calls(choices) == [("mul", {"x": 3})] and choices[-1]["finish_reason"] == "tool_calls"
