"""Continuous batching over token counts: FCFS, chunked prefill under a per-step token budget,
preemption by recompute when blocks run out. No tensors here.

Each request has num_computed_tokens and num_tokens; a step gives it up to
num_tokens - num_computed_tokens new tokens (its whole prompt, a chunk of it, or one decode
token). There is no prefill or decode phase to track.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fapool.config import SchedulerConfig
from fapool.core.kv_cache_manager import KVCacheManager
from fapool.core.pool_manager import Segment
from fapool.request import Request, RequestStatus


class ScheduledRequest:
    """One request's work in a step. A plain slotted class: one is built per request per step."""

    __slots__ = (
        "request", "num_new_tokens", "num_computed_tokens", "block_ids", "segments", "completes_known_tokens"
    )

    def __init__(
        self,
        request: Request,
        num_new_tokens: int,
        num_computed_tokens: int,  # before this step
        block_ids: list[int],  # local blocks
        segments: list[Segment] | None = None,  # KV on attention workers, if any
        completes_known_tokens: bool | None = None,  # None: computed from the request
    ) -> None:
        self.request = request
        self.num_new_tokens = num_new_tokens
        self.num_computed_tokens = num_computed_tokens
        self.block_ids = block_ids
        self.segments: list[Segment] = [] if segments is None else segments
        # True when this step computes up to the request's last known token, so its logits give
        # the next token (false for a non-final prefill chunk). Taken when scheduled: launching
        # the step adds a placeholder to the request.
        if completes_known_tokens is None:
            total = request.num_tokens_with_placeholders
            completes_known_tokens = num_computed_tokens + num_new_tokens == total
        self.completes_known_tokens: bool = completes_known_tokens

    def __repr__(self) -> str:
        return (
            f"ScheduledRequest({self.request!r}, num_new_tokens={self.num_new_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, blocks={len(self.block_ids)}, "
            f"segments={len(self.segments)}, completes_known_tokens={self.completes_known_tokens})"
        )


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), CoW
    pool_block_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, src, dst)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # could not run even with the cache empty

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A forked sibling joins the running set directly (its KV is already there)."""
        self.running.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        running, scheduled, allocate = self.running, out.scheduled, self.kv.allocate_slots

        # 1. Running requests first, in arrival order; preempt from the back when full.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            out_len, in_flight = len(req.output_token_ids), req.num_output_placeholders
            total = len(req.prompt_token_ids) + out_len + in_flight  # num_tokens_with_placeholders
            num_new = min(total - req.num_computed_tokens, budget)
            if in_flight and out_len + in_flight >= req.max_tokens:
                num_new = 0  # the token still in flight is its last one
            if num_new <= 0:
                i += 1
                continue
            while not allocate(req, num_new):
                victim = running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new, req.num_computed_tokens + num_new == total))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it can run either

        # 2. Admit waiting requests FCFS, unless this step already had to preempt.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            if req.num_output_placeholders:  # preempted with a token in flight: wait for it
                break
            computed, num_cached = self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, computed):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.status == RequestStatus.WAITING:
                req.metrics.num_cached_tokens = num_cached
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

        # Nothing runs and the head of the queue cannot be admitted into an idle cache: it
        # never will be (admission checks make this rare). Fail it rather than spin.
        if not out.scheduled and not self.running and self.waiting:
            req = self.waiting.popleft()
            req.error = "the request does not fit in the KV cache even with nothing else running"
            self.finish(req, RequestStatus.FINISHED_ERROR)
            out.failed.append(req)

        out.block_copies = self.kv.take_pending_copies()
        out.pool_block_copies = self.kv.take_pool_copies()
        if self.kv.pool_manager is not None:
            self.kv.pool_manager.step += 1
        return out

    def _scheduled(self, req: Request, num_new: int, completes: bool | None = None) -> ScheduledRequest:
        rid, kv = req.request_id, self.kv
        segments = kv.pool_segments(rid) if kv.pool_manager is not None else None
        return ScheduledRequest(req, num_new, req.num_computed_tokens, kv.block_ids(rid), segments, completes)

    def preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop its blocks (full ones stay in the prefix cache),
        put it at the head of the queue."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
