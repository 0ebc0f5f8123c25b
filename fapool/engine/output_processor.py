"""After each step: append sampled tokens, detokenize, check stop conditions, and build the
RequestOutput of each request group (a prompt with n completions)."""

from __future__ import annotations

import time

from fapool.detokenizer import DetokenizerState, IncrementalDetokenizer, find_stop
from fapool.outputs import CompletionOutput, Logprob, RequestOutput
from fapool.request import Request, RequestStatus
from fapool.sampling_params import RequestOutputKind


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._detokenizers: dict[bool, IncrementalDetokenizer] = {}  # by skip_special_tokens (stateless)
        self._detok: dict[str, DetokenizerState] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # DELTA requests: (tokens, characters) already output

    def on_token(
        self, req: Request, token: int, logprobs: list[Logprob] | None, now: float | None = None
    ) -> RequestStatus | None:
        """Record one sampled token (arrived at `now`, time.monotonic; default now); returns the
        finishing status if the request is done."""
        if now is None:
            now = time.monotonic()
        req.append_token(token, logprobs)
        metrics = req.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        status = req.check_stop()
        if self.tokenizer is not None:
            params = req.params
            state = self._detok.get(req.request_id)
            if state is None:
                state = self._detok[req.request_id] = DetokenizerState()
            detok = self._detokenizers.get(params.skip_special_tokens)
            if detok is None:
                detok = self._detokenizers[params.skip_special_tokens] = IncrementalDetokenizer(
                    self.tokenizer, params.skip_special_tokens
                )
            new = detok.step(state, req.output_token_ids)
            req.text = state.text
            stops = params.stop
            if stops and new:
                hit = find_stop(req.text, len(new), stops)
                if hit is not None:
                    idx, stop = hit
                    end = idx + len(stop) if params.include_stop_str_in_output else idx
                    req.text = req.text[:end]
                    req.stop_reason = stop
                    status = RequestStatus.FINISHED_STOPPED
        return status

    def forget(self, req: Request) -> None:
        self._detok.pop(req.request_id, None)
        self._sent.pop(req.request_id, None)

    def make_output(self, group: list[Request]) -> RequestOutput | None:
        """The group's output as its output_kind asks; None for a FINAL_ONLY group still running."""
        first = group[0]
        kind = first.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not first.finished:  # the common case, at once
            return None
        # A group is done when all n completions are; a parent that ended before forking its
        # siblings (error, abort) ends the group alone.
        finished = all(r.finished for r in group) and (len(group) == first.params.n or first.num_pending_forks > 0)
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outs = [self._completion(r, kind is RequestOutputKind.DELTA) for r in sorted(group, key=lambda r: r.index)]
        if finished and first.metrics.finished_time is None:
            first.metrics.finished_time = time.monotonic()
        return RequestOutput(
            request_id=first.group_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outs,
            finished=finished,
            metrics=first.metrics,
            error=next((r.error for r in group if r.error), None),
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
        )

    def _completion(self, r: Request, delta: bool) -> CompletionOutput:
        tok0, char0 = self._sent.get(r.request_id, (0, 0)) if delta else (0, 0)
        if delta:
            self._sent[r.request_id] = (len(r.output_token_ids), max(char0, len(r.text)))
        return CompletionOutput(
            index=r.index,
            text=r.text[char0:],
            token_ids=r.output_token_ids[tok0:],
            finish_reason=r.status.value if r.finished else None,
            stop_reason=r.stop_reason,
            logprobs=r.output_logprobs[tok0:] if r.params.logprobs is not None else None,
        )
