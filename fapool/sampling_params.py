"""Per-request sampling parameters (vLLM's names and meanings), validated at construction."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's kinds): everything so far, only what
    is new since its last output, or a single output once it finishes (LLM.generate's choice:
    no output is built for the steps in between)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output (vLLM's structured outputs), exactly one of: a JSON schema
    (as JSON text; '{"type": "object"}' for any object), a regex, a choice among strings, or a
    Lark grammar. Enforced by a token mask where the sampler runs (fapool.layers.structured)."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"invalid SamplingParams.structured_outputs={given}: give exactly one of json, regex, choice, grammar"
            )
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"invalid SamplingParams.structured_outputs={self.choice!r}: choices must be non-empty strings")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None  # per-request reproducibility
    max_tokens: int | None = 16  # None: up to the model's context limit
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0: chosen only)
    # Per prompt token after the first: its logprob and this many top alternatives. The whole
    # prompt is computed (no prefix-cache hits), in a single-process engine.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Logits edits (fapool.layers.logits_processors), applied on the device between the forward
    # pass and the draw.
    repetition_penalty: float = 1.0  # > 0; 1: off
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); a dict is accepted
    min_tokens: int = 0  # end-of-sequence and stop tokens masked until this many tokens
    bad_words: tuple[str, ...] = ()  # never generated (tokenized by the engine)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be generated
    structured_outputs: StructuredOutputs | None = None  # output constrained by a grammar
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        # Accept lists / a single string / a dict for convenience, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        for name in ("stop_token_ids", "bad_words"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        elif not isinstance(self.logit_bias, tuple):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias or ()))
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, tuple):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0.0:
            raise bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (disabled) or a positive int")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "must be an int or None")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative ints")
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) and v <= hi
            if not ok:
                raise bad(name, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

        number("repetition_penalty", 0.0, 2.0**31, lo_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        for pair in self.logit_bias:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and _is_int(pair[0])
                and pair[0] >= 0
                and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool)
                and -100.0 <= pair[1] <= 100.0
            ):
                raise bad("logit_bias", "must map token ids (ints >= 0) to biases in [-100, 100]")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise bad("bad_words", "must be non-empty strings")
        if self.allowed_token_ids is not None and not (
            self.allowed_token_ids and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids (ints >= 0)")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20
        ):
            raise bad("logprobs", "must be an int in [0, 20] or None")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or isinstance(self.prompt_logprobs, bool)
            or not 0 <= self.prompt_logprobs <= 20
        ):
            raise bad("prompt_logprobs", "must be an int in [0, 20] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @functools.cached_property  # read per request per step; the fields are frozen
    def has_logits_processing(self) -> bool:
        """Whether fapool.layers.logits_processors edits this request's logits."""
        return bool(
            self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or self.min_tokens
            or self.bad_words
            or self.allowed_token_ids
            or self.structured_outputs
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


GREEDY = SamplingParams(temperature=0.0)
