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
    assert parse('{ "a": 1 }', TOOLS, named)[1][0].arguments == '{"a": 1}'
    content, calls = parse('[{"name": "mul", "arguments": {"x": 3}}]', TOOLS, "required")
    assert content is None and [(c.name, c.arguments) for c in calls] == [("mul", '{"x": 3}')]
    assert parse('[{"name": "mul", "argum', TOOLS, "required") == ('[{"name": "mul", "argum', [])  # cut short


def test_constraints():
    assert constraint(TOOLS, "auto") is None and constraint(TOOLS, "none") is None
    schema = json.loads(constraint(TOOLS, "required").json)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = json.loads(constraint(TOOLS, {"type": "function", "function": {"name": "mul"}}).json)
    assert named["type"] == "object" and named["x-guidance"] == {"whitespace_flexible": False}
