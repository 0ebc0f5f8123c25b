"""Async scheduling for a multi-process driver (MultiRankRunner, AFDRunner): launched steps run
one after another on one thread while the engine schedules the next, sampling on the driver's
device; a token the step in flight samples is filled into the next step's inputs when that one
starts. A step's failure is re-raised where the engine waits for its tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fapool.core.scheduler import ScheduledRequest
from fapool.layers.sampler import DeviceLogprobs, compute_logprobs, sample_tokens
from fapool.layers.sampling_batch import SamplingBatch
from fapool.worker.model_runner import PendingTokens
from fapool.worker.step_plan import MicroBatchPlan

# Runs a prepared step: (logits of the due rows or None, the due requests).
RunStep = Callable[[], tuple[torch.Tensor | None, list[ScheduledRequest]]]


class _Done:
    """A launched step's completion, as PendingTokens waits for it (re-raises its failure)."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def synchronize(self) -> None:
        self.future.result()


class BackgroundSteps:
    def __init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        self._sampled: dict[str, int] = {}  # the last launched step's tokens, by request

    def launch(self, plans: Sequence[MicroBatchPlan], due: list[ScheduledRequest], run: RunStep) -> PendingTokens:
        """Queue a step whose plans were built from the scheduler's output (here, on the
        engine's thread: it reads the requests, which the engine then updates); return at once."""
        rows = [s.request.sampling_row() for s in due]
        pending = PendingTokens(due, torch.empty(len(due), dtype=torch.long), None)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="fapool-step")
        pending.ready = _Done(self._thread.submit(self._run, plans, rows, pending, run))
        return pending

    @torch.inference_mode()
    def _run(self, plans: Sequence[MicroBatchPlan], rows: list, pending: PendingTokens, run: RunStep) -> None:
        for plan in plans:
            for row, req in plan.placeholders:
                plan.input_ids[row] = self._sampled[req.request_id]  # the ranks' messages share the list
        logits, due = run()
        if logits is None:
            return
        batch = SamplingBatch.build(rows, logits.shape[-1], logits.device)
        tokens = sample_tokens(logits, batch)
        if batch.logprobs is not None:
            lps = compute_logprobs(logits, tokens, batch.logprobs)
            pending.host_logprobs = DeviceLogprobs(lps.chosen.cpu(), lps.top_values.cpu(), lps.top_ids.cpu())
        pending.host.copy_(tokens.cpu())
        self._sampled = {s.request.request_id: t for s, t in zip(due, pending.host.tolist())}

    def shutdown(self) -> None:
        """A launched step finishes (or fails) first."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
