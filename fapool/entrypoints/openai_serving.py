"""Engine outputs -> OpenAI response bodies and stream chunks, for completions and chat.

The engine hands back cumulative RequestOutputs (all text and tokens so far); a renderer keeps,
per choice, how much it has sent and emits the difference. With stop strings it holds back a
tail that could still become a stop string, so text the engine later cuts is never sent.
Choice index = prompt index * n + completion index, as in vLLM.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fapool.entrypoints import openai_protocol as proto
from fapool.entrypoints import tool_calls
from fapool.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class _Choice:
    text_len: int = 0  # characters sent
    num_tokens: int = 0  # tokens sent (token ids / logprobs)
    finished: bool = False
    call_id: str | None = None  # a named tool call's id, once its first chunk is out


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class Renderer(ABC):
    object_name = ""
    chunk_object = ""

    def __init__(
        self, request_id: str, model: str, req: proto.SamplingFields, prompts: list[list[int]], tokenizer
    ) -> None:
        self.id = request_id
        self.model = model
        self.req = req
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.n = req.n
        self.stops = tuple([req.stop] if isinstance(req.stop, str) else req.stop or ())
        self.choices = [_Choice() for _ in range(len(prompts) * req.n)]
        self._tokens: dict[int, str] = {}

    # Token strings ----------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        s = self._tokens.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"
            self._tokens[token_id] = s
        return s

    # Usage --------------------------------------------------------------------------------------
    def usage(self, num_completion_tokens: int) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": num_completion_tokens,
            "total_tokens": prompt + num_completion_tokens,
        }

    @property
    def token_level(self) -> bool:
        """Whether every new token is worth a chunk even when it adds no visible text."""
        return self.req.return_token_ids or self.num_logprobs is not None

    @property
    @abstractmethod
    def num_logprobs(self) -> int | None:
        """Top logprobs per token the request asked for (None: none)."""

    # Streaming ----------------------------------------------------------------------------------
    def first_chunks(self) -> list[dict]:
        return []

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        result = []
        for c in out.outputs:
            i = index * self.n + c.index
            st = self.choices[i]
            if st.finished:
                continue
            new_tokens = c.token_ids[st.num_tokens :]
            lps = c.logprobs[st.num_tokens :] if c.logprobs is not None else None
            chunk = self.choice_chunk(i, c, st, new_tokens, lps)
            if chunk is None:  # nothing to send yet: its tokens go with the next chunk
                continue
            result.append(chunk)
            st.num_tokens = len(c.token_ids)
            st.finished = c.finish_reason is not None
        if result and all(st.finished for st in self.choices) and not self.req.include_usage:
            result[-1]["usage"] = self.usage(sum(st.num_tokens for st in self.choices))
        return result

    def choice_chunk(
        self, i: int, c: CompletionOutput, st: _Choice, new_tokens: list[int], lps: list[list[Logprob]] | None
    ) -> dict | None:
        """Choice i's next chunk (None: nothing new to send): the text it can show now."""
        finished = c.finish_reason is not None
        visible = len(c.text) if finished or not self.stops else len(c.text) - held_back(c.text, self.stops)
        delta = c.text[st.text_len : visible] if visible > st.text_len else ""
        if not (delta or finished or (new_tokens and self.token_level)):
            return None
        chunk = self.chunk(i, delta, new_tokens, lps, c if finished else None, st.text_len)
        st.text_len = max(st.text_len, visible)
        return chunk

    def final_chunks(self) -> list[dict]:
        if not self.req.include_usage:
            return []
        return [
            {
                "id": self.id,
                "object": self.chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(sum(st.num_tokens for st in self.choices)),
            }
        ]

    @abstractmethod
    def chunk(
        self,
        i: int,
        delta: str,
        tokens: list[int],
        lps: list[list[Logprob]] | None,
        done: CompletionOutput | None,
        offset: int,
    ) -> dict:
        """One streamed chunk in the endpoint's shape."""

    @abstractmethod
    def full_response(self, finals: list[RequestOutput]) -> dict:
        """The non-streaming response body."""

    @staticmethod
    def finish(c: CompletionOutput | None) -> dict:
        if c is None:
            return {"finish_reason": None, "stop_reason": None}
        return {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def prompt_logprobs_json(renderer: Renderer, out: RequestOutput) -> list[dict | None] | None:
    """vLLM's shape: per prompt token, None for the first, else {token id: {logprob,
    decoded_token}} for the prompt's token and the top alternatives."""
    if out.prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {str(lp.token_id): {"logprob": _finite(lp.logprob), "decoded_token": renderer.token_str(lp.token_id)}
              for lp in entry}
        for entry in out.prompt_logprobs
    ]


class CompletionRenderer(Renderer):
    object_name = chunk_object = "text_completion"

    @property
    def num_logprobs(self) -> int | None:
        return self.req.logprobs

    def logprobs(self, lps: list[list[Logprob]] | None, offset: int) -> dict | None:
        if lps is None:
            return None
        out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for chosen, *alts in lps:
            s = self.token_str(chosen.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(_finite(chosen.logprob))
            top = {self.token_str(a.token_id): _finite(a.logprob) for a in alts}
            top.setdefault(s, _finite(chosen.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def echo_logprobs(self, out: RequestOutput, lps: list[list[Logprob]]) -> dict:
        """The prompt's tokens then the completion's, as OpenAI reports them with echo: the
        first prompt token has no logprob (nothing precedes it)."""
        first = self.token_str(out.prompt_token_ids[0])
        prompt = self.logprobs(out.prompt_logprobs[1:], len(first))
        offset = prompt["text_offset"][-1] + len(prompt["tokens"][-1]) if prompt["tokens"] else len(first)
        completion = self.logprobs(lps, offset)
        return {
            "text_offset": [0, *prompt["text_offset"], *completion["text_offset"]],
            "token_logprobs": [None, *prompt["token_logprobs"], *completion["token_logprobs"]],
            "tokens": [first, *prompt["tokens"], *completion["tokens"]],
            "top_logprobs": [None, *prompt["top_logprobs"], *completion["top_logprobs"]],
        }

    def prompt_text(self, index: int) -> str:
        """echo: the prompt as sent, or its token ids decoded."""
        prompt = self.req.prompt
        if self.req.truncate_prompt_tokens is None and isinstance(prompt, str):
            return prompt
        if self.req.truncate_prompt_tokens is None and prompt and isinstance(prompt[0], str):
            return prompt[index]
        return self.tokenizer.decode(self.prompts[index]) if self.tokenizer is not None else ""

    def _choice(self, i: int, text: str, tokens: list[int], lps, done, offset: int) -> dict:
        choice = {"index": i, "text": text, "logprobs": self.logprobs(lps, offset), **self.finish(done)}
        if self.req.return_token_ids:
            choice["token_ids"] = tokens
        return choice

    def chunk(self, i, delta, tokens, lps, done, offset) -> dict:
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(i, delta, tokens, lps, done, offset)],
        }

    def full_response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(finals):
            echo = self.prompt_text(index) if self.req.echo else ""
            for c in out.outputs:
                choice = self._choice(index * self.n + c.index, echo + c.text, c.token_ids, c.logprobs, c, 0)
                if self.req.echo and c.logprobs is not None and out.prompt_logprobs is not None:
                    choice["logprobs"] = self.echo_logprobs(out, c.logprobs)
                if self.req.return_token_ids:
                    choice["prompt_token_ids"] = self.prompts[index]
                if out.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(self, out)
                choices.append(choice)
        tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(tokens),
        }


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @property
    def num_logprobs(self) -> int | None:
        return self.req.num_logprobs

    def _entry(self, lp: Logprob) -> dict:
        s = self.token_str(lp.token_id)
        return {"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8"))}

    def logprobs(self, lps: list[list[Logprob]] | None) -> dict | None:
        if lps is None:
            return None
        return {
            "content": [
                {**self._entry(chosen), "top_logprobs": [self._entry(a) for a in alts]}
                for chosen, *alts in lps
            ]
        }

    def first_chunks(self) -> list[dict]:
        return [
            {
                "id": self.id,
                "object": self.chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for i in range(len(self.choices))
        ]

    def choice_chunk(self, i, c, st, new_tokens, lps) -> dict | None:
        """With tools, content is streamed only while it cannot be a call: a named call's
        arguments stream as argument deltas; "auto" streams the text before a `<tool_call>`
        and the calls once finished; "required" sends its calls once finished."""
        choice = self.req.effective_tool_choice
        if choice == "none":
            return super().choice_chunk(i, c, st, new_tokens, lps)
        finished = c.finish_reason is not None
        delta: dict = {}
        if isinstance(choice, dict):  # the whole text is the call's arguments
            call: dict = {"index": 0, "function": {"arguments": c.text[st.text_len :]}}
            if st.call_id is None:
                st.call_id = tool_calls.new_call_id()
                call.update(id=st.call_id, type="function")
                call["function"]["name"] = choice["function"]["name"]
            if call["function"]["arguments"] or "id" in call:
                delta["tool_calls"] = [call]
            st.text_len = len(c.text)
        else:
            if choice == "auto" and not finished:
                opening = c.text.find(tool_calls.OPENING, st.text_len)
                visible = len(c.text) - held_back(c.text, (tool_calls.OPENING, *self.stops))
                visible = min(visible, opening) if opening >= 0 else visible
                if visible > st.text_len:
                    delta["content"] = c.text[st.text_len : visible]
                    st.text_len = visible
            if finished:
                rest, calls = tool_calls.parse(c.text[st.text_len :], self.req.tool_dicts, choice)
                if rest:
                    delta["content"] = rest
                if calls:
                    delta["tool_calls"] = [{"index": k, **t.json()} for k, t in enumerate(calls)]
                st.text_len = len(c.text)
        if not (delta or finished or (new_tokens and self.token_level)):
            return None
        chunk = self.chunk(i, "", new_tokens, lps, c if finished else None, st.text_len)
        chunk["choices"][0]["delta"] = delta
        if finished and c.finish_reason == "stop" and "tool_calls" in delta and not isinstance(choice, dict):
            chunk["choices"][0]["finish_reason"] = "tool_calls"
        return chunk

    def chunk(self, i, delta, tokens, lps, done, offset) -> dict:
        choice = {
            "index": i,
            "delta": {"content": delta} if delta or done is None else {},
            "logprobs": self.logprobs(lps),
            **self.finish(done),
        }
        if self.req.return_token_ids:
            choice["token_ids"] = tokens
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def full_response(self, finals: list[RequestOutput]) -> dict:
        out = finals[0]
        choices = []
        tool_choice = self.req.effective_tool_choice
        for c in out.outputs:
            choice = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c.logprobs),
                **self.finish(c),
            }
            if tool_choice != "none":
                content, calls = tool_calls.parse(c.text, self.req.tool_dicts, tool_choice)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content, "tool_calls": [t.json() for t in calls]}
                    if c.finish_reason == "stop" and not isinstance(tool_choice, dict):
                        choice["finish_reason"] = "tool_calls"
            if self.req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        body = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(sum(len(c.token_ids) for c in out.outputs)),
        }
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.prompts[0]
        if out.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(self, out)
        return body
