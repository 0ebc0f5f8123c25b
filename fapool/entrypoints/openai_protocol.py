"""OpenAI API request and response models (the subset fapool serves) and the error shape.

Requests take OpenAI's field names plus vLLM's sampling extensions (top_k, min_p, ignore_eos,
stop_token_ids, return_token_ids, ...). Bounds are declared on the fields so a bad value is a
400 naming the field, and so the published OpenAPI schema says what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fapool.entrypoints import tool_calls
from fapool.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputs

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Below this a temperature is treated as greedy, as vLLM does: dividing logits by ~1e-45
# overflows to inf and the sampler would see NaN probabilities.
MIN_TEMPERATURE = 1e-5

TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class OpenAIModel(BaseModel):
    # Unknown fields are ignored (clients send options we do not use); NaN and inf are refused;
    # strict: "5" is not a number and false is not a token id (400, not a silent coercion).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


# Errors ---------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


# Requests -------------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json='{"type": "object"}')
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError(f"invalid SamplingParams.response_format={self.type!r}: json_schema needs a 'schema'")
        return StructuredOutputs(json=json.dumps(self.json_schema.schema_))


class StructuredOutputsField(OpenAIModel):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def spec(self) -> StructuredOutputs:
        text = self.json_ if self.json_ is None or isinstance(self.json_, str) else json.dumps(self.json_)
        choice = None if self.choice is None else tuple(self.choice)
        return StructuredOutputs(json=text, regex=self.regex, choice=choice, grammar=self.grammar)


STRUCTURED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "response_format")


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None: the one model served
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # vLLM extension: token ids in each choice
    # Logits edits (fapool.layers.logits_processors); vLLM's names and bounds.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0**31)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    bad_words: list[str] | None = None
    allowed_token_ids: list[TokenId] | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)  # keep the last k (-1: max_model_len)
    # vLLM's extension: each prompt token's logprob and this many alternatives (non-streaming).
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # Structured outputs (vLLM's fields and OpenAI's response_format): at most one.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark
    structured_outputs: StructuredOutputsField | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a requested feature this server does not implement."""
        if self.truncate_prompt_tokens == 0:
            return "truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or at least 1"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is returned in non-streaming responses only"
        given = [n for n in STRUCTURED_FIELDS if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            return given[1], f"give one structured-output constraint, not {', '.join(given)}"
        return None

    def structured(self) -> StructuredOutputs | None:
        """The request's output constraint; raises ValueError naming the field when it is malformed."""
        if self.guided_json is not None:
            text = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return StructuredOutputs(json=text)
        if self.guided_regex is not None:
            return StructuredOutputs(regex=self.guided_regex)
        if self.guided_choice is not None:
            return StructuredOutputs(choice=tuple(self.guided_choice))
        if self.guided_grammar is not None:
            return StructuredOutputs(grammar=self.guided_grammar)
        if self.structured_outputs is not None:
            return self.structured_outputs.spec()
        if self.response_format is not None:
            return self.response_format.spec()
        return None

    def logit_bias_by_id(self) -> dict[int, float]:
        """logit_bias with int keys; raises ValueError naming the field for a key that is not one."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"invalid SamplingParams.logit_bias={self.logit_bias!r}: key {key!r} is not a token id")
            out[int(key)] = bias
        return out

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the field (SamplingParams' own validation)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            n=self.n,
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias_by_id(),
            min_tokens=self.min_tokens,
            bad_words=tuple(self.bad_words or ()),
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            structured_outputs=self.structured(),
            # A full response needs only the final output: none is built for the steps between.
            output_kind=RequestOutputKind.CUMULATIVE if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo and self.stream:
            return "echo", "echo is not supported with stream=true"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must equal n (beam search is not supported)"
        return super().unsupported()

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """echo with logprobs reports the prompt's tokens too (OpenAI's legacy completions):
        their logprobs are prompt_logprobs."""
        params = super().sampling_params(max_tokens, logprobs)
        if self.echo and logprobs is not None and params.prompt_logprobs is None:
            params = dataclasses.replace(params, prompt_logprobs=logprobs)
        return params


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def as_template_input(self) -> dict[str, Any]:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        )
        # Templates written before the "developer" role know it as "system".
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ToolFunction(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments


class Tool(OpenAIModel):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)  # deprecated name
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    @property
    def effective_tool_choice(self) -> str | dict:
        """"none", "auto", "required" or {"type": "function", "function": {"name": ...}}."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()

    def structured(self) -> StructuredOutputs | None:
        return tool_calls.constraint(self.tool_dicts, self.effective_tool_choice) or super().structured()

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        choice = self.effective_tool_choice
        if self.tool_choice not in (None, "none") and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        if isinstance(choice, dict) and choice["function"]["name"] not in {t.function.name for t in self.tools or ()}:
            return "tool_choice", f"tool_choice names {choice['function']['name']!r}, which is not among the tools"
        if choice == "required" or isinstance(choice, dict):
            given = [n for n in STRUCTURED_FIELDS if getattr(self, n) is not None]
            if given:
                return "tool_choice", f"tool_choice {choice!r} constrains the output already; drop {given[0]}"
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message", "continue_final_message needs add_generation_prompt=false"
        if self.continue_final_message and self.messages[-1].role != "assistant":
            return "continue_final_message", "continue_final_message needs the last message to be the assistant's"
        return super().unsupported()


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# Responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fapool"
    root: str | None = None
    max_model_len: int | None = None
    vocab_size: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
