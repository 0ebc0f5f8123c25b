"""The driver of attention-FFN disaggregation (rank 0: attention rank 0, the scheduler's side);
the roles and the per-layer exchange are in afd_worker.

Each step the driver groups the scheduled requests by attention rank (the partition of their
blocks), cuts each rank's requests into the step's micro-batches (the same count on every rank,
empty where a rank has too few requests), sends every attention rank its micro-batches with
block ids local to its partition and every FFN rank the token counts it will receive, runs its
own share, then gathers the due logits (in the scheduler's order) and every rank's report.
A rank that dies or hangs stops the engine with an error naming it (restart it).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from fapool.attention.backend import AttentionBackend
from fapool.config import EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput
from fapool.layers.cpu_linear import pack_for_device
from fapool.worker import comm
from fapool.worker.afd_worker import (
    AttentionSide,
    afd_topology,
    attention_weights,
    drop_mlps,
    mlp_slice,
)
from fapool.worker.dense_worker import send_weights
from fapool.worker.launcher import WorkerGroup, leave_cores_to_ranks, rank_devices
from fapool.worker.background_steps import BackgroundSteps
from fapool.worker.model_runner import ModelRunner, PendingTokens
from fapool.worker.protocol import AFDInit, AFDStep, MicroBatch, RankReport, StepReport, Tag
from fapool.worker.step_plan import MicroBatchPlan, MicroBatchPolicy, plan_micro_batch, split_micro_batches

logger = logging.getLogger(__name__)


def localize(mb: MicroBatch, first_block: int, block_size: int) -> MicroBatch:
    """A micro-batch's block tables and slots, relative to the first block of its rank's partition."""
    meta = dict(mb.meta_args)
    meta["block_tables"] = [[b - first_block for b in table] for table in meta["block_tables"]]
    shift = first_block * block_size
    meta["slot_mapping"] = [s - shift if s >= 0 else s for s in meta["slot_mapping"]]
    return dataclasses.replace(mb, meta_args=meta)


@dataclasses.dataclass
class _AFDStep:
    """A step's per-rank plans, built before any rank is contacted."""

    index: int
    out: SchedulerOutput
    shape: tuple[int, int, int]  # (sequences on the busiest rank, tokens, longest context)
    count: int  # micro-batches
    steps: list[AFDStep]  # per attention rank
    tokens: list[list[int]]  # [micro-batch][attention rank]: the FFN ranks' row counts
    order: list[ScheduledRequest]  # the due requests in the order the ranks' logits arrive
    plans: list[MicroBatchPlan]  # every micro-batch's plan (their input ids: async placeholders)
    due: list[ScheduledRequest]
    plan_s: float


class AFDRunner(ModelRunner):
    """Rank 0 of a disaggregated engine: attention rank 0 and the scheduler's side."""

    pack_cpu_linears = False  # packed after the other ranks got their weights

    def __init__(self, config: EngineConfig, model: nn.Module, backend: AttentionBackend) -> None:
        super().__init__(config, model, backend)
        self.use_cuda_graphs = False
        self.topology = afd_topology(config)
        topo = self.topology
        self.rank_devices = rank_devices(config, topo.world_size)
        # Attention ranks sharing the driver's GPU split its KV budget; FFN ranks hold no KV.
        shared = self.rank_devices.devices[: topo.attention_ranks]
        self.ranks_on_device = shared.count(shared[0])
        self.partition_blocks = ModelRunner.determine_num_blocks(self)
        self.timeout_s = config.pool.worker_timeout_s
        self.micro_batches = MicroBatchPolicy(config.pool.micro_batches)
        self.step_stats: list[StepReport] = []
        self.waiter = comm.Waiter()
        self.failure: comm.WorkerFailure | None = None
        self.fault_hang: dict[int, float] = {}  # tests: rank -> seconds to stall on its next step
        self._step = 0
        self._stopped = False
        self.background = BackgroundSteps()  # async scheduling
        self.workers: WorkerGroup | None = None
        self.transport = "cpu"
        self.side: AttentionSide | None = None
        if self.device.type == "cpu":
            leave_cores_to_ranks(topo.world_size - 1)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self) -> None:
        topo = self.topology
        startup_s = max(60.0, self.timeout_s)
        self.workers = WorkerGroup(self.config, topo.world_size)
        self.transport = comm.transport_device(str(self.device))
        for r in range(1, topo.world_size):
            role = "attention" if r < topo.attention_ranks else "ffn"
            init = AFDInit(self.config, role, self.partition_blocks if role == "attention" else 0)
            comm.send_object(init, r, self.waiter, startup_s, tag=Tag.INIT, device=self.transport)
        with torch.no_grad():
            for r in range(1, topo.attention_ranks):
                send_weights(attention_weights(self.model), r, self.waiter, startup_s, self.transport)
            for j, r in enumerate(topo.ffn_rank_ids):
                weights = {
                    f"{i}.{name}": t
                    for i, layer in enumerate(self.model.model.layers)
                    for name, t in mlp_slice(layer.mlp, j, topo.ffn_ranks).items()
                }
                send_weights(weights, r, self.waiter, startup_s, self.transport)
        drop_mlps(self.model)
        pack_for_device(self.model, self.device)
        self.side = AttentionSide(self.config, self.model, topo, 0, self.device, self._wait)

    def _wait(self, work, peer: int, what: str, buf) -> None:
        self.waiter.wait(work, self.timeout_s, peer, what, buf)

    # KV cache -----------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        return self.partition_blocks * self.topology.attention_ranks

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        if self.side is None:  # GPU profiling of the whole model, before the ranks start
            super().allocate_kv_cache(num_blocks, dtype)
            return
        self.side.allocate_kv_cache(self.partition_blocks)
        self.kv_caches = self.side.kv_caches

    # The step -----------------------------------------------------------------------------
    def rank_of(self, s: ScheduledRequest) -> int:
        return s.block_ids[0] // self.partition_blocks

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        return self._run(self._prepare(out))

    def launch(self, out: SchedulerOutput) -> PendingTokens:
        """Run one step in the background (BackgroundSteps) and return at once."""
        step = self._prepare(out)
        return self.background.launch(step.plans, step.due, lambda: self._run(step))

    def _run(self, step: _AFDStep) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        try:
            return self._execute(step)
        except (comm.WorkerFailure, RuntimeError) as e:
            blamed = comm.blame_rank(self.workers.procs, e)
            if blamed is None:
                raise
            rank, why = blamed
            self.failure = comm.WorkerFailure(rank, f"step {step.index}", why)
            self.failure.args = (
                f"{self.topology.describe(rank)} {why}; the disaggregated engine cannot continue (restart it)",
            )
            logger.error("%s", self.failure)
            raise self.failure from e

    def _prepare(self, out: SchedulerOutput) -> _AFDStep:
        """Each rank's plans (host work on the scheduler's output; no rank is contacted)."""
        if self.failure is not None:
            raise self.failure
        self._step += 1
        t_start = time.perf_counter()
        topo, bs, n = self.topology, self.block_size, self.partition_blocks
        per_rank: list[list[ScheduledRequest]] = [[] for _ in range(topo.attention_ranks)]
        for s in out.scheduled:
            per_rank[self.rank_of(s)].append(s)
        shape = (
            max(len(g) for g in per_rank),
            out.num_tokens,
            max(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled),
        )
        count = self.micro_batches.choose(*shape)
        steps, order, plans = [], [], []  # per attention rank; the due requests in logits order
        tokens = [[0] * topo.attention_ranks for _ in range(count)]
        for a, reqs in enumerate(per_rank):
            groups = split_micro_batches(reqs, count) if reqs else []
            groups += [[] for _ in range(count - len(groups))]
            mbs = []
            for i, g in enumerate(groups):
                plans.append(plan_micro_batch(g, bs))
                mbs.append(localize(plans[-1].dense(), a * n, bs))  # shares the plan's input ids
                tokens[i][a] = mbs[-1].num_tokens
                order += [s for s in g if s.completes_known_tokens]
            copies = [(s - a * n, d - a * n) for s, d in out.block_copies if s // n == a]
            steps.append(AFDStep(self._step, mbs, copies))
        due = [s for s in out.scheduled if s.completes_known_tokens]
        plan_s = time.perf_counter() - t_start
        return _AFDStep(self._step, out, shape, count, steps, tokens, order, plans, due, plan_s)

    def _execute(self, step: _AFDStep) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        t_start = time.perf_counter()
        topo = self.topology
        for r, p in self.workers.procs.items():
            if not p.is_alive():
                raise comm.WorkerFailure(r, f"step {step.index}", "process exited")
        steps, tokens, order, count, out = step.steps, step.tokens, step.order, step.count, step.out
        t0 = time.perf_counter()
        for r in range(1, topo.world_size):
            msg = steps[r] if r < topo.attention_ranks else AFDStep(step.index, tokens=tokens)
            hang = self.fault_hang.pop(r, 0.0)
            if hang:
                msg = dataclasses.replace(msg, hang_s=hang)
            comm.send_object(msg, r, self.waiter, self.timeout_s, tag=Tag.STEP, device=self.transport)
        own = RankReport(0, comm_s=time.perf_counter() - t0, role="attention")
        parts = [self.side.run(steps[0], own)]
        t0 = time.perf_counter()
        vocab = self.config.model.vocab_size
        for a in range(1, topo.attention_ranks):
            n = sum(len(mb.logit_rows) for mb in steps[a].micro_batches if mb.num_tokens)
            if n:
                buf = torch.empty(n, vocab, dtype=torch.float32, device=self.transport)
                self._wait(comm.recv_tensor(buf, a, Tag.LOGITS), a, "logits", buf)
                parts.append(buf.to(self.device))
        stats = StepReport(step.index, out.num_tokens, count)
        for r in range(1, topo.world_size):
            stats.ranks[r] = comm.recv_object(r, self.waiter, self.timeout_s, tag=Tag.REPORT, device=self.transport)
        own.idle_s += time.perf_counter() - t0
        stats.ranks[0] = own

        due = step.due
        logits = None
        if due:
            stacked = torch.cat([p for p in parts if p is not None])  # rank-major, as `order`
            row = {id(s): k for k, s in enumerate(order)}
            logits = stacked[torch.tensor([row[id(s)] for s in due], device=stacked.device)]
        stats.plan_s = step.plan_s
        stats.dense_s = own.compute_s
        stats.wait_s = own.idle_s
        stats.total_s = step.plan_s + time.perf_counter() - t_start
        self.micro_batches.record(*step.shape, count, stats.total_s)
        self.step_stats.append(stats)
        return logits, due

    def take_failures(self) -> list[tuple[int, str]]:
        return []  # no rank's loss is recoverable here: execute() raises it

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.background.shutdown()
        if self.workers is not None:
            if self.failure is not None or self.side is None:
                self.workers.kill()
            else:
                self.workers.shutdown(list(range(1, self.topology.world_size)), self.waiter, self.transport)
        self.waiter.close()
