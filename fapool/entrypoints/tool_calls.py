"""Tool calling for chat completions, as vLLM serves it.

The tools go to the chat template (`tools=`), which tells the model how to call them. What the
request's `tool_choice` asks for decides the output:

- "auto": free text; Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks in it (the format of Qwen2.5's and Hermes' templates) become `tool_calls`, the rest
  stays the content;
- a named function: the output is constrained to a JSON object valid for that function's
  parameters (structured outputs), and it is the call's arguments;
- "required": the output is constrained to a JSON array of one or more `{"name", "arguments"}`
  objects, each for one of the tools;
- "none": the tools are not offered and nothing is parsed.

Streaming (openai_serving.ChatRenderer.chunks) sends the same calls as deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fapool.sampling_params import StructuredOutputs

OPENING = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Compact JSON (llguidance's option): a model cannot spend its tokens on whitespace inside a call.
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def json(self) -> dict:
        return {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or _ANY_OBJECT


def constraint(tools: list[dict], choice: Any) -> StructuredOutputs | None:
    """The output constraint tool_choice implies (None: free text)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredOutputs(json=json.dumps({**parameters(tool), **_COMPACT}))
    if choice == "required":
        calls = [  # one object per tool: its name, and arguments valid for its parameters
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **_COMPACT}
        return StructuredOutputs(json=json.dumps(schema))
    return None


def parse(text: str, tools: list[dict], choice: Any) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished output."""
    if isinstance(choice, dict):
        return None, [ToolCall(choice["function"]["name"], _compact(text))]
    if choice == "required":
        try:
            return None, [ToolCall(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError):  # cut by max_tokens: no complete call
            return text, []
    if choice == "none":
        return text, []
    names = {t["function"]["name"] for t in tools}
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)  # not a call the model finished: it stays in the content
        if not isinstance(call, dict) or call.get("name") not in names:
            return match.group(0)
        calls.append(ToolCall(call["name"], json.dumps(call.get("arguments", {}))))
        return ""

    content = _HERMES.sub(take, text).strip()
    return (content or None, calls) if calls else (text, [])


def _compact(text: str) -> str:
    """The arguments as compact JSON (what a named call streams, so both responses agree)."""
    try:
        return json.dumps(json.loads(text), separators=(",", ":"))
    except json.JSONDecodeError:  # cut by max_tokens: the arguments as generated
        return text
