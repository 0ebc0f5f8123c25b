"""The engine: admit requests, then step() = schedule -> execute -> update."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fapool.attention.backend import AttentionBackend
from fapool.config import EngineConfig
from fapool.core.block_pool import BlockPool
from fapool.core.kv_cache_manager import KVCacheManager
from fapool.core.pool_manager import PoolManager
from fapool.core.scheduler import Scheduler
from fapool.engine.output_processor import OutputProcessor
from fapool.layers.logits_processors import LogitsEditor, needs_processing, needs_token_values
from fapool.layers.sampler import compute_logprobs, logprob_lists, sample_tokens
from fapool.layers.sampling_batch import SamplingBatch
from fapool.layers.structured import GrammarCompiler, StructuredOutputError
from fapool.outputs import RequestOutput
from fapool.request import Request, RequestStatus
from fapool.sampling_params import RequestOutputKind, SamplingParams
from fapool.worker.executor import Executor, create_executor
from fapool.worker.model_runner import PendingTokens, to_host

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt, too long, cannot fit the KV cache)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_tokens_used: int  # tokens whose KV is stored in used blocks (a shared block counts once)
    block_size: int
    num_preemptions: int
    prefix_cache_hit_blocks: int
    prefix_cache_query_blocks: int
    pool_size: int = 0  # attention workers serving at least one request now
    pool_live_workers: int = 0  # attention-pool worker processes alive now
    pool_workers_lost: int = 0  # attention-pool workers lost so far (their requests recomputed)
    pool_worker_starts: int = 0  # elastic pool (Ray): workers started as the pool grew
    pool_worker_stops: int = 0  # ... and stopped once idle
    pool_join_seconds: list[float] = field(default_factory=list)  # each start's latency until it joined
    pool_join_wait_s: float = 0.0  # steps' total wait for joins (workers started ahead hide theirs)
    kv_tokens_per_worker: dict[int, int] = field(default_factory=dict)  # pool workers' KV (whole blocks)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total

    @property
    def kv_utilisation(self) -> float:
        """Stored tokens / tokens the used blocks could hold (seed 001's waste measure)."""
        cap = self.kv_blocks_used * self.block_size
        return 0.0 if cap == 0 else self.kv_tokens_used / cap


@dataclass
class _InFlight:
    """A launched step whose greedy tokens have not been processed yet (async scheduling)."""

    pending: PendingTokens
    groups: list[str]  # request groups it touched, in order


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        backend: AttentionBackend,
        tokenizer=None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.executor: Executor = create_executor(config, model, backend)
        want_async = config.scheduler.async_scheduling
        if want_async is None:
            want_async = config.device.startswith("cuda")
        self.async_scheduling = bool(want_async) and self.executor.supports_async
        self._inflight: _InFlight | None = None
        # Requests that lost pool KV at the last drain, when a step had been launched after the
        # drained one: scheduled before the loss was known, their tokens from it are dropped too.
        self._lost_inflight: set[str] = set()
        try:
            layout = self.executor.initialize_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        num_blocks = layout.num_blocks
        pool_manager = None
        if layout.pool_blocks_per_worker is not None:
            pool_manager = PoolManager(config.pool, config.cache.block_size, layout.pool_blocks_per_worker)
        pool = BlockPool(num_blocks, enable_caching=config.cache.enable_prefix_caching, partitions=layout.partitions)
        self.kv = KVCacheManager(pool, config.cache.block_size, pool_manager)
        self.pool_manager = pool_manager
        self.scheduler = Scheduler(config.scheduler, self.kv, config.max_model_len)
        self.outputs = OutputProcessor(tokenizer)
        self.groups: dict[str, list[Request]] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)  # the seeds of requests that give none
        self._grammars: GrammarCompiler | None = None  # structured outputs, built on first use
        self._editor: LogitsEditor | None = None  # penalties, biases, masks: built on first use
        self.eos_token_ids = tuple(config.model.eos_token_ids)
        self.worker_failures: list[tuple[int, str]] = []
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.cache.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.pool.num_blocks

    # Admission ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request; raises RequestError (a ValueError) with the reason."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise RequestError(f"request id {request_id!r} is already in use")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass prompt_token_ids instead of text")
            text = prompt
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.config.model.vocab_size
        # Checks that run in C (a long prompt has tens of thousands of ids); bools are refused.
        if set(map(type, token_ids)) != {int} or min(token_ids) < 0 or max(token_ids) >= vocab:
            raise RequestError(f"prompt token ids must be ints in [0, {vocab})")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens; max_model_len is {max_len}, leaving no room to generate"
            )
        if params.prompt_logprobs is not None and not self.executor.supports_prompt_logprobs:
            raise RequestError("prompt_logprobs needs a single-process engine (no pool, TP or PP)")
        ids_in_params = [t for t, _ in params.logit_bias] + list(params.allowed_token_ids or ())
        if any(t >= vocab for t in ids_in_params):
            raise RequestError(f"logit_bias and allowed_token_ids take token ids in [0, {vocab})")
        bad_words = self._bad_words_token_ids(params.bad_words)
        matcher = self._matcher(params)
        room = max_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if not self.kv.can_ever_fit(len(token_ids) + max_tokens):
            needed = self.kv.num_blocks_needed(len(token_ids) + max_tokens)
            raise RequestError(
                f"the request needs {needed} KV blocks ({len(token_ids)} prompt + {max_tokens} new tokens) "
                f"but the whole cache has {self.num_kv_blocks}; lower max_tokens or raise the KV budget"
            )
        req = Request(
            request_id,
            token_ids,
            params,
            max_tokens,
            self.eos_token_ids,
            prompt=text,
            arrival_time=arrival_time,
            group_seed=params.seed if params.seed is not None else self._seeds.getrandbits(63),
        )
        req.bad_words_token_ids = bad_words
        req.matcher = matcher
        self.groups[request_id] = [req]
        self.scheduler.add(req)
        return request_id

    def _matcher(self, params: SamplingParams):
        """The grammar matcher of a structured-output request (None without a constraint)."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self.tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer; this model has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.config.model.vocab_size)
        try:
            return self._grammars.matcher(spec)
        except StructuredOutputError as e:
            raise RequestError(str(e)) from e

    def _bad_words_token_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        """Each bad word as token ids, as it reads at the start of the text and after a space
        (vLLM's two forms)."""
        if not words:
            return []
        if self.tokenizer is None:
            raise RequestError("bad_words needs the model's tokenizer; this model has none")
        out: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def abort_request(self, request_id: str) -> None:
        for req in self.groups.pop(request_id, []):
            if not req.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self.outputs.forget(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    # The step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run a step; returns one output for each request group whose tokens it processed, in
        first-touched order (none for a FINAL_ONLY group still running)."""
        sched = self.scheduler.schedule()
        if not sched.is_empty and self._can_launch(sched):
            touched = self._launch(sched)
        else:
            touched = self._drain()
            # The drained step may have stopped requests that this one scheduled blind.
            sched.scheduled = [s for s in sched.scheduled if not s.request.finished]
            if not sched.is_empty:
                touched += self._step_sync(sched)
        touched += [r.group_id for r in sched.failed]
        self.resize_pool()
        outputs = []
        for g in dict.fromkeys(touched):
            group = self.groups.get(g)
            if group is None:
                continue
            first = group[0]
            if first.params.output_kind is RequestOutputKind.FINAL_ONLY and not first.finished:
                continue  # make_output's None, without the call: a running FINAL_ONLY group
            out = self._finalize(g)
            if out is not None:
                outputs.append(out)
        return outputs

    def resize_pool(self) -> None:
        """An elastic pool (Ray) starts the workers that running sequences will reach within
        pool_prestart_tokens and stops those idle past pool_idle_timeout_s: after every step,
        and from an idle server's loop."""
        pm = self.pool_manager
        if pm is None or not self.executor.elastic_pool:
            return
        ahead = self.config.pool.pool_prestart_tokens
        soon = pm.workers_at({r.request_id: r.num_tokens + ahead for r in self.scheduler.running}) if ahead else set()
        self.executor.resize_pool(pm.active_workers(), soon)

    def _can_launch(self, sched) -> bool:
        """Async unless a prompt forks siblings this step (forking needs the tokens on the
        host), its prompt's logprobs are being computed (ModelRunner.execute), or a request's
        logits are edited (penalties, biases, masks) and the executor cannot launch in halves;
        every other token, greedy or sampled, with logprobs or not, is drawn on the device."""
        if not self.async_scheduling:
            return False
        split = self.executor.supports_split_launch
        for s in sched.scheduled:
            req = s.request
            if s.completes_known_tokens and (req.num_pending_forks or (not split and needs_processing(req))):
                return False
            if req.prompt_logprobs is not None and s.num_computed_tokens < req.num_prompt_tokens:
                return False
        return True

    def _launch(self, sched) -> list[str]:
        """Launch this step, then process the previous one while the device runs this one.

        Timeline (host above, device below): the host schedules and fills step n+1 and
        processes step n-1's tokens while the device computes step n.

            host    | sched n | launch n | process n-1 | sched n+1 | launch n+1 | process n |
            device            |======== step n ========|====== step n+1 ======|

        A request that stopped at step n-1 has been scheduled blind for step n; that result is
        dropped when step n is processed (its KV write lands in blocks it no longer owns, but
        before any later step can reuse them: the device runs steps in order).

        A step whose logits are edited (penalties, biases, masks) launches in halves: the
        forward pass, the edits, then the draw, still without waiting for the device. The
        penalties count the in-flight step's tokens on the device, so most edits go in at once;
        a grammar or a bad word of several tokens reads the values of the latest tokens, so
        then step n-1 is processed on the host first, while the forward pass of step n runs (as
        vLLM's async scheduling with structured outputs)."""
        scheduled = sched.scheduled
        edit = [s.request for s in scheduled if s.completes_known_tokens and needs_processing(s.request)]
        after_drain = any(needs_token_values(r) for r in edit)
        if edit:
            fwd = self.executor.launch_forward(sched)
            if not after_drain:
                self._edit_logits(fwd.logits, [s.request for s in fwd.due], self.executor.tokens_in_flight())
                pending = self.executor.launch_sample(fwd, edited=True)
        else:
            pending = self.executor.launch(sched)
        groups: dict[str, None] = {}  # the groups it touched, in order
        for s in scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            groups[req.group_id] = None
        for s in fwd.due if edit else pending.due:
            s.request.num_output_placeholders += 1
        drained = self._drain(launched_after=True)
        if after_drain:
            # Requests the drain just stopped keep their row, unedited: its token is dropped.
            self._edit_logits(fwd.logits, [s.request for s in fwd.due])
            pending = self.executor.launch_sample(fwd, edited=True)
        self._inflight = _InFlight(pending, list(groups))
        return drained

    def _drain(self, launched_after: bool = False) -> list[str]:
        """Process the in-flight step's tokens (waits for them); returns its groups."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tokens = inflight.pending.tokens()
        logprobs = inflight.pending.logprobs(tokens)
        # Attention workers lost by now: their requests are recomputed, and their tokens from
        # this step (and from the one launched after it) were computed without that KV.
        lost = self._handle_worker_failures()
        drop = lost | self._lost_inflight
        self._lost_inflight = lost if launched_after else set()
        self._record_pool_stats()
        now = time.monotonic()  # the step's tokens all reach the host now
        record, finish = self.outputs.on_token, self.scheduler.finish
        for s, tok, lp in zip(inflight.pending.due, tokens, logprobs):
            req = s.request
            req.num_output_placeholders -= 1
            if req.finished or (drop and req.request_id in drop):  # stopped, aborted or lost since scheduled
                continue
            if tok < 0 or req.matcher is not None:
                self._on_token(req, tok, lp, now)
            else:  # _on_token's common case
                status = record(req, tok, lp, now)
                if status is not None:
                    finish(req, status)
        return inflight.groups

    def _on_token(self, req: Request, tok: int, lp, now: float | None = None) -> None:
        if tok < 0:
            req.error = "sampling failed: the model's logits hold NaN"
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
            return
        if req.matcher is not None and not req.matcher.consume_token(tok):
            req.error = f"structured output: token {tok} rejected by the grammar ({req.matcher.get_error()})"
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
            return
        status = self.outputs.on_token(req, tok, lp, now)
        if status is None and req.matcher is not None and req.matcher.is_stopped():
            status = RequestStatus.FINISHED_STOPPED  # the grammar is complete and allows nothing more
        if status is not None:
            self.scheduler.finish(req, status)

    def _step_sync(self, sched) -> list[str]:
        logits, due = self.executor.execute(sched)
        lost = self._handle_worker_failures()
        if lost:
            keep = [i for i, s in enumerate(due) if s.request.request_id not in lost]
            due = [due[i] for i in keep]
            logits = logits[keep] if logits is not None and keep else None
        for s in sched.scheduled:
            if s.request.request_id not in lost:
                s.request.num_computed_tokens += s.num_new_tokens
        self._record_pool_stats()
        if due:
            self._sample_and_update(logits, due)
        return [s.request.group_id for s in sched.scheduled]

    def _handle_worker_failures(self) -> set[str]:
        """Attention workers that died or hung this step: stop placing KV on them and
        recompute (preempt) every request that had KV there. Their results from this step
        are dropped, so no token is lost and none is computed from missing KV."""
        failures = self.executor.take_failures()
        lost: set[str] = set()
        for worker, why in failures:
            assert self.pool_manager is not None
            self.worker_failures.append((worker, why))
            affected = set(self.pool_manager.mark_dead(worker))
            logger.error("attention worker %d lost (%s); recomputing %d request(s)", worker, why, len(affected))
            lost |= affected
        for req in list(self.scheduler.running):
            if req.request_id in lost:
                self.scheduler.preempt(req)
        return lost

    def _record_pool_stats(self) -> None:
        history = self.executor.reports
        if history and self.pool_manager is not None:
            history[-1].pool_size = len(self.pool_manager.active_workers())
            history[-1].kv_tokens_per_worker = self.pool_manager.kv_tokens_per_worker()

    def _sample_and_update(self, logits: torch.Tensor, due) -> None:
        """Draw the due requests' tokens (and those of siblings a prompt forks now, from its
        row) on the device, then bring them to the host at once."""
        targets: list[Request] = []
        rows: list[int] = []
        for row, s in enumerate(due):
            for r in [s.request, *self._fork_siblings(s.request)]:
                targets.append(r)
                rows.append(row)
        if rows != list(range(len(due))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        if any(needs_processing(r) for r in targets):
            self._edit_logits(logits, targets)
        batch = SamplingBatch.build([r.sampling_row() for r in targets], logits.shape[-1], logits.device)
        tokens = sample_tokens(logits, batch)
        lps = compute_logprobs(logits, tokens, batch.logprobs) if batch.logprobs is not None else None
        pending = to_host(tokens, lps, [])
        tokens_host = pending.tokens()
        asked = [r.params.logprobs for r in targets]
        for req, tok, lp in zip(targets, tokens_host, logprob_lists(tokens_host, pending.host_logprobs, asked)):
            self._on_token(req, tok, lp)

    def _edit_logits(self, logits: torch.Tensor, reqs: list[Request], in_flight=None) -> None:
        if self._editor is None:
            self._editor = LogitsEditor(logits.shape[-1], logits.device)
        self._editor.apply(logits, reqs, in_flight)

    def _fork_siblings(self, req: Request) -> list[Request]:
        """When a request with n > 1 finishes its prompt, its n - 1 siblings share its blocks."""
        if req.num_pending_forks == 0:
            return []
        siblings = []
        for i in range(1, req.num_pending_forks + 1):
            child = req.fork(i, f"{req.group_id}#{i}")
            self.kv.fork(req, child)
            self.scheduler.add_running(child)
            self.groups[req.group_id].append(child)
            siblings.append(child)
        req.num_pending_forks = 0
        return siblings

    def _finalize(self, group_id: str) -> RequestOutput | None:
        """The group's output (None: FINAL_ONLY and still running); a finished group is forgotten."""
        group = self.groups[group_id]
        out = self.outputs.make_output(group)
        if out is not None and out.finished:
            for r in group:
                self.outputs.forget(r)
            del self.groups[group_id]
        return out

    def shutdown(self) -> None:
        """Stop worker processes (a no-op for a single-process engine); safe to call twice."""
        self._inflight = None
        self.executor.shutdown()

    # Introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        pool = self.kv.pool
        starts, stops, joins, join_wait = self.executor.pool_events()
        running = self.scheduler.running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=pool.num_used_blocks,
            kv_blocks_total=pool.num_blocks,
            kv_tokens_used=self._stored_tokens(),
            block_size=self.config.cache.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_blocks=pool.num_cache_hits,
            prefix_cache_query_blocks=pool.num_cache_queries,
            pool_size=len(self.pool_manager.active_workers()) if self.pool_manager else 0,
            pool_live_workers=self.executor.live_pool_workers(),
            pool_workers_lost=len(self.worker_failures),
            pool_worker_starts=starts,
            pool_worker_stops=stops,
            pool_join_seconds=joins,
            pool_join_wait_s=join_wait,
            kv_tokens_per_worker=self.pool_manager.kv_tokens_per_worker() if self.pool_manager else {},
        )

    def _stored_tokens(self) -> int:
        """Tokens held in used blocks, each block counted once (shared blocks are one block)."""
        bs = self.config.cache.block_size
        fill: dict[int, int] = {}
        for req in self.scheduler.running:
            for i, bid in enumerate(self.kv.block_ids(req.request_id)):
                fill[bid] = max(fill.get(bid, 0), min(bs, req.num_computed_tokens - i * bs))
        return sum(max(0, v) for v in fill.values())
