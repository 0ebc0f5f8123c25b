"""A request as the scheduler sees it: token ids, how many have KV computed, and its status.

One Request is one sequence. A prompt with SamplingParams.n > 1 starts as one Request; when its
prompt is computed it samples n first tokens and forks n - 1 siblings that share its KV blocks
(copy-on-write), so the prompt is computed once.
"""

from __future__ import annotations

import enum
import time

from fapool.layers.sampler import request_seed
from fapool.outputs import Logprob, RequestMetrics
from fapool.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self._finished


for _s in RequestStatus:  # a plain attribute: Request.finished is read per request per step
    _s._finished = _s.name.startswith("FINISHED")


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        prompt: str | None = None,
        group_id: str | None = None,
        index: int = 0,
        arrival_time: float | None = None,
        group_seed: int = 0,  # the group's seed: SamplingParams.seed, else one the engine drew
    ) -> None:
        self.request_id = request_id
        self.group_id = group_id or request_id
        self.index = index  # which of the group's n completions this is
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[list[Logprob]] = []
        # Per prompt position (None for the first, and until computed), when asked for.
        self.prompt_logprobs: list[list[Logprob] | None] | None = (
            [None] * len(self.prompt_token_ids) if params.prompt_logprobs is not None else None
        )
        self.params = params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by a step still running on the device (async scheduling): counted as
        # scheduled input, not yet known on the host. At most one when the scheduler runs.
        self.num_output_placeholders = 0
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Siblings still to be forked when the prompt finishes (n - 1 for a fresh group).
        self.num_pending_forks = params.n - 1 if index == 0 else 0
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())
        self.bad_words_token_ids: list[list[int]] = []  # params.bad_words tokenized (by the engine)
        self.matcher = None  # structured outputs: the grammar's state (fapool.layers.structured)
        self.group_seed = group_seed
        self.sampling_seed = request_seed(group_seed, index)  # the sampler's hash key
        # Set by the output processor: detokenized text so far.
        self.text = ""

    # Token bookkeeping -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_output_placeholders

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole sequence first (the hot
        paths ask for a block or a token of a long sequence every step)."""
        prompt = self.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]

    def sampling_row(self) -> tuple[SamplingParams, int, int]:
        """What the sampler needs for this request's next token: its parameters, seed and the
        token's output index (placeholders of a step in flight included)."""
        return self.params, self.sampling_seed, len(self.output_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status._finished

    def append_token(self, token_id: int, logprobs: list[Logprob] | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def fork(self, index: int, request_id: str) -> Request:
        """A sibling that shares everything computed so far (its KV blocks are forked by the
        KV cache manager); its own seed makes its samples differ."""
        child = Request(
            request_id,
            self.prompt_token_ids,
            self.params,
            self.max_tokens,
            self.eos_token_ids,
            prompt=self.prompt,
            group_id=self.group_id,
            index=index,
            arrival_time=self.metrics.arrival_time,
            group_seed=self.group_seed,
        )
        child.bad_words_token_ids = self.bad_words_token_ids
        child.matcher = self.matcher.deep_copy() if self.matcher is not None else None
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.metrics.first_scheduled_time = self.metrics.first_scheduled_time
        child.metrics.num_cached_tokens = self.metrics.num_cached_tokens
        return child

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions after the last appended token (stop strings are checked
        on text by the detokenizer)."""
        out = self.output_token_ids
        last = out[-1]
        params = self.params
        if last in self.eos_token_ids and not params.ignore_eos:
            self.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if len(out) >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
