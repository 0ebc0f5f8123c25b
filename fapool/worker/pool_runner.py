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

from fapool.attention.backend import AttentionBackend, merge_tree
from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig
from fapool.core.head_placement import HEAD_POLICIES
from fapool.core.scheduler import SchedulerOutput
from fapool.models.llama import Pending
from fapool.worker import comm
from fapool.worker.dense_worker import drive_micro_batches
from fapool.worker.launcher import WorkerGroup
from fapool.worker.model_runner import ModelRunner
from fapool.worker.protocol import AttentionInit, AttentionStep, StepReport, Tag, exchange_tag
from fapool.worker.step_plan import MicroBatchPlan, MicroBatchPolicy, plan_micro_batch, split_micro_batches
from fapool.worker.step_clock import StepClock

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
        self.clock = StepClock(self.device)  # the step's waits on attention workers (execute)
        self.worker_ids = list(range(1, pool.attention_workers + 1))
        self.mode = pool.pool_mode
        m = config.model
        group = m.num_queries_per_kv
        if config.sparse_attention:
            # A pooled sequence's blocks are split between this rank and the workers, so no one
            # holder can pick its top blocks; local attention goes through the wrapper backend
            # (dense). Sparse decode inside the pool would need the holders to share scores.
            logger.warning(
                "sparse attention is not applied with the attention pool: decode stays dense; the "
                "profile only weighs heads for --head-placement lpt (pool mode head)"
            )
        if self.mode == "head":
            # With a sparse-attention profile, heads weigh what their budgets cost (seed 003's
            # sparsity-aware placement); otherwise every head weighs the same.
            weights = None
            if config.sparse_attention:
                from fapool.sparse.placement import head_weights
                from fapool.sparse.profile import SparseProfile

                # Placed once for every length: weigh the heads at the longest context the
                # engine serves (where the pool's attention is; budgets depend on the length).
                longest = config.scheduler.max_model_len or m.max_position_embeddings
                weights = head_weights(SparseProfile.load(config.sparse_attention).fractions_at(longest))
            self.kv_heads = HEAD_POLICIES[pool.head_placement](m.num_key_value_heads, self.worker_ids, weights)
        else:
            self.kv_heads = {w: list(range(m.num_key_value_heads)) for w in self.worker_ids}
        self._head_idx = {
            w: (
                torch.tensor(hs, device=self.device),
                torch.tensor([h * group + g for h in hs for g in range(group)], device=self.device),
            )
            for w, hs in self.kv_heads.items()
        }
        # A worker's block holds every KV head of every layer (head mode: a share of them).
        self.worker_num_blocks = pool.worker_kv_blocks or ModelRunner.determine_num_blocks(
            self, ModelRunner.bytes_per_block(self)
        )
        self.pool_start = -(-pool.pool_threshold // self.block_size) * self.block_size  # first pooled position
        self.micro_batches = MicroBatchPolicy(pool.micro_batches)
        self.failed: dict[int, str] = {}
        self._new_failures: list[int] = []
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
        return [self.topology.attention_rank(w) for w in self.worker_ids if self._live(w)]

    # Failure bookkeeping ------------------------------------------------------------------
    def _fail(self, worker: int, why: str) -> None:
        if worker not in self.failed:
            logger.error("attention worker %d (rank %d) failed: %s", worker, self.topology.attention_rank(worker), why)
            self.failed[worker] = why
            self._new_failures.append(worker)

    def take_failures(self) -> list[tuple[int, str]]:
        new, self._new_failures = self._new_failures, []
        return [(w, self.failed[w]) for w in new]

    def _live(self, worker: int) -> bool:
        return worker not in self.failed

    # The step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list]:
        t_start = time.perf_counter()
        self._step += 1
        for w in self.worker_ids:
            if self._live(w) and not self.workers.alive(self.topology.attention_rank(w)):
                self._fail(w, "process exited")
        self.copy_blocks(out.block_copies)
        shape = (len(out.scheduled), out.num_tokens, max(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled))
        groups = split_micro_batches(out.scheduled, self.micro_batches.choose(*shape))
        plans = [plan_micro_batch(g, self.block_size, self.pool_start, self.mode, i) for i, g in enumerate(groups)]
        stats = StepReport(self._step, out.num_tokens, len(plans))
        self.clock = StepClock(self.device, stream_ordered=self.transport != "cpu")
        told = self._send_step_plans(plans, out.pool_block_copies)
        self._send_dense_plans(plans, out)

        self._sends: list = []
        gens = [self._forward(plan, i, len(plans), stats) for i, plan in enumerate(plans)]
        hidden = drive_micro_batches(gens)
        self.clock.measure("wait", lambda: self._end_exchanges(told, stats))
        self._finish_dense_step(stats)

        hidden_all = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        due = [s for s in out.scheduled if s.completes_known_tokens]
        logits = None
        if due:
            rows, offset = [], 0
            for s in out.scheduled:
                offset += s.num_new_tokens
                if s.completes_known_tokens:
                    rows.append(offset - 1)
            logits = self.model.compute_logits(hidden_all[torch.tensor(rows, device=self.device)])
        stats.wait_s += self.clock.finish().get("wait", 0.0)  # on a GPU, after the step's work is done
        stats.total_s = time.perf_counter() - t_start
        stats.dense_s = max(0.0, stats.total_s - stats.wait_s - stats.tp_comm_s - stats.local_attention_s)
        self.micro_batches.record(*shape, len(plans), stats.total_s)
        self.step_stats.append(stats)
        return logits, due

    def _end_exchanges(self, told: list[int], stats: StepReport) -> None:
        """Wait for the step's sends to the workers, then their reports."""
        for work, buf, w in self._sends:
            if not self._live(w):
                self.waiter.abandon(work, buf)
            else:
                try:
                    self.waiter.wait(work, self.config.pool.worker_timeout_s, self.topology.attention_rank(w), "send", buf)
                except comm.WorkerFailure as e:
                    self._fail(w, str(e))
        self._sends = []
        for w in told:
            if self._live(w):
                try:
                    rank = self.topology.attention_rank(w)
                    ws = comm.recv_object(rank, self.waiter, self.config.pool.worker_timeout_s, tag=Tag.REPORT, device=self.transport)
                    stats.workers[w] = ws
                except comm.WorkerFailure as e:
                    self._fail(w, str(e))

    def _send_step_plans(self, plans: list[MicroBatchPlan], pool_copies) -> list[int]:
        told = []
        for w in self.worker_ids:
            if not self._live(w):
                continue
            batches = {i: p.routes[w].batch for i, p in enumerate(plans) if w in p.routes}
            copies = [(s, d) for ww, s, d in pool_copies if ww == w]
            hang = self.fault_hang.pop(w, 0.0)
            if not batches and not copies and not hang:
                continue
            msg = AttentionStep(self._step, copies, batches, len(plans), hang)
            try:
                rank = self.topology.attention_rank(w)
                comm.send_object(
                    msg, rank, self.waiter, self.config.pool.worker_timeout_s, tag=Tag.STEP, device=self.transport
                )
                told.append(w)
            except comm.WorkerFailure as e:
                self._fail(w, str(e))
        return told

    def _forward(self, plan: MicroBatchPlan, index: int, count: int, stats: StepReport):
        ids = torch.tensor(plan.input_ids, dtype=torch.long).to(self.device)
        pos = torch.tensor(plan.positions, dtype=torch.long).to(self.device)
        meta = AttentionMetadata.build(device=self.device, **plan.local_meta_args)
        attend = self._attend(plan, index, count, meta, stats)
        return self.model.model.forward_steps(ids, pos, self.kv_caches, attend)

    def _attend(
        self, plan: MicroBatchPlan, index: int, count: int, meta: AttentionMetadata, stats: StepReport
    ) -> _PoolAttend:
        return _PoolAttend(self, plan, index, count, meta, stats)

    def shutdown(self) -> None:
        """Stop the workers; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.workers.shutdown(self._shutdown_ranks(), self.waiter, self.transport)
        self.waiter.close()


class _PoolAttend:
    """The attend hook for one micro-batch: remote shares out first, local share meanwhile,
    merge when the generator resumes."""

    def __init__(self, runner: PoolModelRunner, plan: MicroBatchPlan, index: int, count: int, meta, stats):
        self.r = runner
        self.plan = plan
        self.index = index
        self.count = count
        self.meta = meta
        self.stats = stats
        dev = runner.device
        self.rows = {
            w: (torch.tensor(rt.q_rows, dtype=torch.long, device=dev), torch.tensor(rt.kv_rows, dtype=torch.long, device=dev))
            for w, rt in plan.routes.items()
        }

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        recvs = self._post_remote(layer, q, k, v)
        out, lse = self._attend_local(layer, q, k, v, kv_cache)
        # Always hand control back, even with nothing remote: micro-batches then advance in
        # lockstep, layer by layer, so K/V an earlier micro-batch writes into a block that a
        # later one shares through the prefix cache is in place before that one reads it.
        return Pending(finish=lambda: self._merge(q, out, lse, recvs) if recvs else out)

    def _post_remote(self, layer: int, q, k, v) -> list:
        """Send each live worker its query rows and new K/V rows (of its heads); post the
        receives of its (out, lse). q/k/v hold every head here."""
        r = self.r
        tag = exchange_tag(layer, self.index, self.count)
        recvs = []
        for w, route in self.plan.routes.items():
            if not r._live(w):
                continue
            q_rows, kv_rows = self.rows[w]
            kv_idx, q_idx = r._head_idx[w]
            nq, nkv = len(route.q_rows), len(route.kv_rows)
            if nq == 0 and nkv == 0:
                continue
            parts = [q[q_rows][:, q_idx].reshape(-1)]
            if nkv:
                parts += [k[kv_rows][:, kv_idx].reshape(-1), v[kv_rows][:, kv_idx].reshape(-1)]
            msg = torch.cat(parts).to(r.transport)
            rank = r.topology.attention_rank(w)
            try:
                r._sends.append((comm.send_tensor(msg, rank, tag), msg, w))
                if nq:
                    buf = torch.empty(nq * len(q_idx) * (q.shape[-1] + 1), dtype=torch.float32, device=r.transport)
                    recvs.append((w, route, comm.recv_tensor(buf, rank, tag + 1), buf))
            except RuntimeError as e:
                r._fail(w, str(e))
        return recvs

    def _attend_local(self, layer: int, q, k, v, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's local K/V and attend over the local blocks (this rank's heads)."""
        r = self.r
        t0 = time.perf_counter()
        k_cache, v_cache = kv_cache
        r.backend.write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        out, lse = r.backend.forward(q, k_cache, v_cache, self.meta, r.model.model.layers[layer].self_attn.scale)
        self.stats.local_attention_s += time.perf_counter() - t0
        return out, lse

    def _merge(self, q, out, lse, recvs) -> torch.Tensor:
        outs, lses = self._remote_partials(q.shape, recvs)
        merged, _ = merge_tree([out.float()] + outs, [lse] + lses)
        return merged.to(q.dtype)

    def _remote_partials(self, shape, recvs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Wait for the workers' answers; each (worker, round) becomes one full-shape partial
        [T, H, D] / [T, H] with lse -inf where that worker saw nothing. A worker that fails
        here is marked failed and left out: its requests are recomputed, the others do not
        depend on it."""
        r = self.r
        T, H, D = shape
        outs, lses = [], []
        for w, route, work, buf in recvs:
            rank, timeout = r.topology.attention_rank(w), r.config.pool.worker_timeout_s
            try:
                r.clock.measure("wait", lambda: r.waiter.wait(work, timeout, rank, "attention", buf))  # noqa: B023
            except comm.WorkerFailure as e:
                r._fail(w, str(e))
                continue
            q_rows, _ = self.rows[w]
            _, q_idx = r._head_idx[w]
            hq = len(q_idx)
            nq = len(route.q_rows)
            buf = buf.to(r.device)
            o = buf[: nq * hq * D].view(nq, hq, D)
            l = buf[nq * hq * D :].view(nq, hq)
            for rows in route.rounds:
                idx = torch.tensor(rows, dtype=torch.long, device=r.device)
                tokens = q_rows[idx]
                full_o = torch.zeros(T, H, D, dtype=torch.float32, device=r.device)
                full_l = torch.full((T, H), float("-inf"), dtype=torch.float32, device=r.device)
                full_o.index_put_((tokens[:, None], q_idx[None, :]), o[idx])
                full_l.index_put_((tokens[:, None], q_idx[None, :]), l[idx])
                outs.append(full_o)
                lses.append(full_l)
        return outs, lses

