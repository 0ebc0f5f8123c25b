"""The driver's model runner when an attention pool is on (seed 000's base worker).

It runs embeddings, projections, FFN and LM head; each layer's attention is split by where
the KV lives: the local share is computed here, the pool's shares are sent to attention
workers, and the (out, lse) partials are merged exactly. A step is cut into micro-batches
whose forward passes are generators: while one waits for the pool, another does its dense
work (ping-pong, seed 004). A worker that dies or goes silent is marked failed; requests
with KV on it are reported so the engine recomputes them, and the rest of the step goes on.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from fapool.attention.backend import AttentionBackend
from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig
from fapool.core.scheduler import SchedulerOutput
from fapool.worker import comm
from fapool.worker.dense_worker import drive_micro_batches
from fapool.worker.launcher import WorkerGroup
from fapool.worker.model_runner import ModelRunner
from fapool.worker.pool_link import PoolAttend, PoolLink, pool_kv_heads
from fapool.worker.protocol import AttentionInit, StepReport, Tag
from fapool.worker.step_plan import MicroBatchPlan, MicroBatchPolicy, plan_micro_batch, split_micro_batches

logger = logging.getLogger(__name__)


class PoolModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> None:
        super().__init__(config, model, backend)
        # Eager steps: a step exchanges messages with other processes mid-layer, which a
        # decode graph cannot hold (and the engine's async scheduling is off for this runner).
        self.use_cuda_graphs = False
        pool = config.pool
        tp = config.parallel.tensor_parallel_size  # > 1 only in TPPoolModelRunner
        self.topology = comm.Topology(tensor_parallel_size=tp, attention_workers=pool.attention_workers)
        # Ranks sharing the driver's GPU split its KV budget (ModelRunner.determine_num_blocks).
        self.rank_devices = comm.engine_rank_devices(config.device, self.topology.world_size)
        self.ranks_on_device = self.rank_devices.ranks_sharing(0)
        self.worker_ids = list(range(1, pool.attention_workers + 1))
        self.mode = pool.pool_mode
        if config.sparse_attention:
            # A pooled sequence's blocks are split between this rank and the workers, so no one
            # holder can pick its top blocks; local attention goes through the wrapper backend
            # (dense). Sparse decode inside the pool would need the holders to share scores.
            logger.warning(
                "sparse attention is not applied with the attention pool: decode stays dense; the "
                "profile only weighs heads for --head-placement lpt (pool mode head)"
            )
        self.kv_heads = pool_kv_heads(config)
        # A worker's block holds every KV head of every layer (head mode: a share of them).
        self.worker_num_blocks = pool.worker_kv_blocks or ModelRunner.determine_num_blocks(
            self, ModelRunner.bytes_per_block(self)
        )
        self.pool_start = -(-pool.pool_threshold // self.block_size) * self.block_size  # first pooled position
        self.micro_batches = MicroBatchPolicy(pool.micro_batches)
        self.step_stats: list[StepReport] = []
        self.fault_hang: dict[int, float] = {}  # tests: worker id -> seconds to stall next step
        self._step = 0
        self._stopped = False
        self.waiter = comm.Waiter()
        if self.device.type == "cpu":
            # Workers compute on one thread each; leave the driver the remaining cores, since
            # oversubscribed OpenMP threads spin against each other and stall every step.
            cores = os.cpu_count() or 1
            others = pool.attention_workers + tp - 1
            torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - others)))
        self.workers = WorkerGroup(config, self.topology.world_size)
        self.transport = comm.transport_device(str(self.device))
        self.link = PoolLink(config, self.topology, self.kv_heads, self.device, self.transport, self.waiter, backend)
        for w in self.worker_ids:
            init = AttentionInit(config, w, self.worker_num_blocks, self.kv_heads[w])
            comm.send_object(init, self.topology.attention_rank(w), self.waiter, 60.0, tag=Tag.INIT, device=self.transport)
        self._start_dense_ranks()

    # Hooks for the other dense ranks of tensor parallelism (TPPoolModelRunner); none here.
    def _start_dense_ranks(self) -> None:
        pass

    def _send_dense_plans(self, plans: list[MicroBatchPlan], out: SchedulerOutput) -> None:
        pass

    def _finish_dense_step(self, stats: StepReport) -> None:
        pass

    def _shutdown_ranks(self) -> list[int]:
        """Ranks still listening for "shutdown"."""
        return [self.topology.attention_rank(w) for w in self.worker_ids if self.link.live(w)]

    def take_failures(self) -> list[tuple[int, str]]:
        return self.link.take_failures()

    # The step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list]:
        t_start = time.perf_counter()
        self._step += 1
        link = self.link
        for w in self.worker_ids:
            if link.live(w) and not self.workers.alive(self.topology.attention_rank(w)):
                link.fail(w, "process exited")
        self.copy_blocks(out.block_copies)
        t_plan = time.perf_counter()
        shape = (len(out.scheduled), out.num_tokens, max(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled))
        groups = split_micro_batches(out.scheduled, self.micro_batches.choose(*shape))
        plans = [plan_micro_batch(g, self.block_size, self.pool_start, self.mode, i) for i, g in enumerate(groups)]
        stats = StepReport(self._step, out.num_tokens, len(plans))
        clock = link.begin_step()
        # The driver's micro-batches advance layer by layer (drive_micro_batches).
        order = [(layer, i, 0) for layer in range(self.config.model.num_hidden_layers) for i in range(len(plans))]
        told = link.send_plans(self._step, plans, out.pool_block_copies, order, self.fault_hang)
        self._send_dense_plans(plans, out)
        stats.plan_s = time.perf_counter() - t_plan

        gens = [self._forward(plan, i, len(plans)) for i, plan in enumerate(plans)]
        hidden = drive_micro_batches(gens)
        clock.measure("wait", link.finish_sends)
        stats.workers = clock.measure("wait", lambda: link.collect_reports(told))
        self._finish_dense_step(stats)

        hidden_all = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        due = [s for s in out.scheduled if s.completes_known_tokens]
        logits = None
        if due:
            rows, offset = [], 0
            for p in plans:
                rows += [offset + r for r in p.logit_rows]
                offset += p.num_tokens
            logits = self.model.compute_logits(hidden_all[torch.tensor(rows, device=self.device)])
        stats.wait_s += clock.finish().get("wait", 0.0)  # on a GPU, after the step's work is done
        stats.local_attention_s = link.local_attention_s
        stats.total_s = time.perf_counter() - t_start
        stats.dense_s = max(0.0, stats.total_s - stats.wait_s - stats.tp_comm_s - stats.local_attention_s)
        self.micro_batches.record(*shape, len(plans), stats.total_s)
        self.step_stats.append(stats)
        return logits, due

    def _forward(self, plan: MicroBatchPlan, index: int, count: int):
        ids = torch.tensor(plan.input_ids, dtype=torch.long).to(self.device)
        pos = torch.tensor(plan.positions, dtype=torch.long).to(self.device)
        meta = AttentionMetadata.build(device=self.device, **plan.local_meta_args)
        attend = self._attend(plan, index, count, meta)
        return self.model.model.forward_steps(ids, pos, self.kv_caches, attend)

    def _attend(self, plan: MicroBatchPlan, index: int, count: int, meta: AttentionMetadata) -> PoolAttend:
        return self.link.attend_hook(plan.routes, plan.num_tokens, index, count, meta, self.model.model.layers)

    def shutdown(self) -> None:
        """Stop the workers; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.workers.shutdown(self._shutdown_ranks(), self.waiter, self.transport)
        self.waiter.close()
