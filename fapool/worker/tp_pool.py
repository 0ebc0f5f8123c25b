"""Tensor parallelism together with the attention pool: dense ranks 0..tp-1 split heads and
FFN as in the static baseline (Megatron column/row linears, all-reduce); the KV of long
sequences past the threshold lives on attention workers, which hold every KV head (head
mode: their share of the heads), exactly as with one dense rank.

Per layer and micro-batch that has remote attention:

    TP rank t > 0                        driver (TP rank 0)                  attention workers
      q/k/v of its heads  ─────────────▶   gather: q/k/v of every head
      local attention (its heads,          q rows + new K/V rows  ─────────▶  write K/V, attend
        its local blocks)                  local attention (its heads)
                                           merge the pool's partials  ◀────── (out, lse)
      merge with its local  ◀────────────  its heads' slice of (out, lse)
      o_proj, all-reduce  ◀─────────────▶  o_proj, all-reduce

Why the driver gathers rather than every TP rank talking to the workers: the workers, their
step plans, the failure handling (a lost worker: recompute its requests) and the placement
stay exactly those of one dense rank — one peer, every head. The price is one q/k/v message in
and one partial out per TP rank and layer, about the all-reduce's size. The merge is exact per
head, so merging the pool's partials on the driver and then each rank's local partial on that
rank changes only rounding.

Every attend hook yields once per layer on every rank, and every rank drives its micro-batches
round-robin (dense_worker.drive_micro_batches), so the ranks' all-reduces pair up.
Under NCCL (a GPU per rank) message tags are ignored and a pair of ranks' sends and receives
run in posting order on one stream, so both sides post them in the same order: per micro-batch
and layer a TP rank sends its q/k/v when it attends and receives the partial only when it
resumes, the order in which the driver receives the q/k/v and sends the partials.
A dense rank that dies or goes silent stops the engine with an error naming it (as in the
static baseline); attention workers fail as in the pool, and their requests are recomputed.
"""

from __future__ import annotations

import logging

import torch

from fapool.attention.backend import AttentionBackend, merge_partials, merge_tree
from fapool.attention.metadata import AttentionMetadata
from fapool.config import EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput
from fapool.models.llama import Pending
from fapool.worker import comm
from fapool.worker.dense_worker import GROUP_TIMEOUT_S, DenseStage, send_weights, shard_model, stage_layers, tp_groups
from fapool.worker.model_runner import ModelRunner
from fapool.worker.parallel_runner import check_parallel, diagnose_dense_failure, rank_weights
from fapool.worker.pool_link import PoolAttend
from fapool.worker.pool_runner import PoolModelRunner
from fapool.worker.protocol import DenseInit, DenseStep, StepReport, Tag, exchange_tag
from fapool.worker.step_plan import MicroBatchPlan

logger = logging.getLogger(__name__)


class TPPoolModelRunner(PoolModelRunner):
    """The driver: TP rank 0 of the dense ranks, and the attention pool's only peer."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> None:
        check_parallel(config)
        self.tp = config.parallel.tensor_parallel_size
        self.failure: comm.WorkerFailure | None = None
        self._sharded = False
        self._tp_sends: list = []
        try:
            super().__init__(config, model, backend)  # starts every rank; _start_dense_ranks below
        except BaseException:
            self._kill()
            raise

    def _dense_ranks(self) -> range:
        """The dense ranks other than the driver (TP ranks 1..tp-1)."""
        return range(1, self.topology.num_dense)

    def _start_dense_ranks(self) -> None:
        topo, startup_s = self.topology, max(60.0, self.config.pool.worker_timeout_s)
        # Decided while the model is whole, for a rank's share of the KV heads; the same
        # block ids on every dense rank.
        self.num_blocks = ModelRunner.determine_num_blocks(self)
        init = DenseInit(self.config, self.num_blocks)
        for r in self._dense_ranks():
            comm.send_object(init, r, self.waiter, startup_s, tag=Tag.INIT, device=self.transport)
        groups = tp_groups(topo, GROUP_TIMEOUT_S)  # the attention workers join in too
        self.stage = DenseStage(self.config, self.model, topo, 0, self._wait_dense)
        layers = stage_layers(self.config.model.num_hidden_layers, 1)
        with torch.no_grad():
            for r in self._dense_ranks():
                send_weights(rank_weights(self.model, topo, layers, r), r, self.waiter, startup_s, self.transport)
            shard_model(self.model, self.stage, groups[0])
        self._sharded = True

    # KV cache: the dense ranks hold their heads' share; the workers' blocks are the base's.
    def bytes_per_block(self) -> int:
        return ModelRunner.bytes_per_block(self) // self.tp

    def determine_num_blocks(self, bytes_per_block: int | None = None) -> int:
        return self.num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if not self._sharded:  # GPU profiling of the whole model, before sharding
            ModelRunner.allocate_kv_cache(self, num_blocks)
            return
        if num_blocks != self.num_blocks:
            raise ValueError(f"the dense ranks hold {self.num_blocks} KV blocks, not {num_blocks}")
        self.stage.allocate_kv_cache(num_blocks)
        self.kv_caches = self.stage.kv_caches

    # The step -----------------------------------------------------------------------------
    def _wait_dense(self, work, peer: int, what: str, buf) -> None:
        self.waiter.wait(work, self.config.pool.worker_timeout_s, peer, what, buf)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        if self.failure is not None:
            raise self.failure
        try:
            return super().execute(out)
        except (comm.WorkerFailure, RuntimeError) as e:
            failure = diagnose_dense_failure(self.topology, self.workers.procs, e, self._step)
            if failure is None:
                raise
            self.failure = failure
            logger.error("%s", failure)
            raise failure from e

    def _send_dense_plans(self, plans: list[MicroBatchPlan], out: SchedulerOutput) -> None:
        """Every TP rank runs the driver's micro-batches with the driver's local metadata
        (pool rows have slot -1 and lie beyond the local kv_lens)."""
        clock = self.stage.new_clock()  # all-reduces and exchanges with the TP ranks
        self._tp_sends = []
        for r in self._dense_ranks():
            if not self.workers.alive(r):
                raise comm.WorkerFailure(r, f"step {self._step}", "process exited")
        step = DenseStep(self._step, [p.dense(with_logits=False) for p in plans], list(out.block_copies))
        clock.measure("comm", lambda: self._send_to_dense_ranks(step, Tag.STEP))

    def _send_to_dense_ranks(self, obj, tag: int) -> None:
        for r in self._dense_ranks():
            comm.send_object(obj, r, self.waiter, self.config.pool.worker_timeout_s, tag=tag, device=self.transport)

    def _finish_dense_step(self, stats: StepReport) -> None:
        self.stage.clock.measure("comm", lambda: self._collect_dense_ranks(stats))
        stats.tp_comm_s = self.stage.clock.finish().get("comm", 0.0)

    def _collect_dense_ranks(self, stats: StepReport) -> None:
        """Wait for the partials sent to the TP ranks, then their reports."""
        for work, buf, r in self._tp_sends:
            self._wait_dense(work, r, "send of attention partials", buf)
        self._tp_sends = []
        for r in self._dense_ranks():
            timeout = self.config.pool.worker_timeout_s
            stats.ranks[r] = comm.recv_object(r, self.waiter, timeout, tag=Tag.REPORT, device=self.transport)

    def _attend(self, plan: MicroBatchPlan, index: int, count: int, meta: AttentionMetadata) -> _TPPoolAttend:
        return _TPPoolAttend(self, plan, index, count, meta)

    # Stop ---------------------------------------------------------------------------------
    def _shutdown_ranks(self) -> list[int]:
        return [*self._dense_ranks(), *super()._shutdown_ranks()]

    def shutdown(self) -> None:
        """Stop every rank; after a dense rank's failure (or a failed start) they are killed,
        since the survivors may be blocked in an exchange that will never complete."""
        if self.failure is None and self._sharded:
            super().shutdown()
            return
        if not getattr(self, "_stopped", True):
            self._stopped = True
            self._kill()

    def _kill(self) -> None:
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.kill()
        if hasattr(self, "waiter"):
            self.waiter.close()


class _TPPoolAttend(PoolAttend):
    """The driver's hook: gathers every head's q/k/v for the pool, sends each TP rank its
    heads' share of the pool's merged partials."""

    def __init__(self, runner: TPPoolModelRunner, plan: MicroBatchPlan, index: int, count: int, meta) -> None:
        super().__init__(runner.link, plan.routes, plan.num_tokens, index, count, meta, runner.model.model.layers)
        self.r = runner

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        if not self.cuts:  # all local: every rank attends its heads on its own
            return super().__call__(layer, q, k, v, kv_cache)
        tag = exchange_tag(layer, self.index, self.count)
        full = self._gather(q, k, v, tag)
        recvs = self.post_remote(layer, *full)
        out, lse = self.attend_local(layer, q, k, v, kv_cache)
        return Pending(finish=lambda: self._merge_and_scatter(full[0].shape, q, out, lse, recvs, tag))

    def _gather(self, q, k, v, tag: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.r
        T, hq, D = q.shape
        hkv = k.shape[1]
        sizes = [T * hq * D, T * hkv * D, T * hkv * D]
        posted = []
        for rank in r._dense_ranks():
            buf = torch.empty(sum(sizes), dtype=q.dtype, device=r.transport)
            posted.append((rank, comm.recv_tensor(buf, rank, tag), buf))
        qs, ks, vs = [q], [k], [v]
        for rank, work, buf in posted:
            r.stage.clock.measure("comm", lambda: r._wait_dense(work, rank, "q/k/v exchange", buf))  # noqa: B023
            bq, bk, bv = buf.to(r.device).split(sizes)
            qs.append(bq.view(T, hq, D))
            ks.append(bk.view(T, hkv, D))
            vs.append(bv.view(T, hkv, D))
        # TP rank t holds q heads t*H/tp.. and KV heads t*Hkv/tp.. (layers/tp.py): in rank
        # order the slices are the global head order the workers' head indices use.
        return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)

    def _merge_and_scatter(self, shape, q, out, lse, recvs, tag: int) -> torch.Tensor:
        r = self.r
        T, H, D = shape
        outs, lses = self.remote_partials(shape, recvs)
        if outs:
            pool_o, pool_l = merge_tree(outs, lses)
        else:  # no worker answered (none had queries here, or they failed): an empty partial
            pool_o = torch.zeros(T, H, D, dtype=torch.float32, device=r.device)
            pool_l = torch.full((T, H), float("-inf"), dtype=torch.float32, device=r.device)
        hq = q.shape[1]
        for rank in r._dense_ranks():
            heads = slice(r.topology.tp_rank_of(rank) * hq, (r.topology.tp_rank_of(rank) + 1) * hq)
            msg = torch.cat([pool_o[:, heads].reshape(-1), pool_l[:, heads].reshape(-1)]).to(r.transport)
            r._tp_sends.append((comm.send_tensor(msg, rank, tag + 1), msg, rank))
        merged, _ = merge_partials([out.float(), pool_o[:, :hq]], [lse, pool_l[:, :hq]])
        return merged.to(q.dtype)
