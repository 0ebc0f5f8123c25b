"""Rank 0 of every multi-rank topology: the driver. The static baselines (tensor parallelism,
Megatron column/row linears with all-reduce; pipeline parallelism, layer stages), the attention
pool (seed 000), and their combinations are configurations of the same roles, so the seed's TP x
PP baseline and the pool run the same model, weights and requests.

- Dense ranks (dense_worker.DenseStage; the driver is one of them: stage 0, TP rank 0) hold a
  TP x PP shard of the model and their heads' local KV.
- Attention ranks (attention_worker) hold the pool's KV blocks and answer (out, lse).

The driver keeps the scheduler and the block managers. Each step it builds the plans once
(step_plan: micro-batches, local metadata, routes to the attention ranks), sends every dense
rank its DenseStep and every attention rank its AttentionStep (with the order the dense ranks
will send in), runs its own share, gets the due rows' logits (from the last stage's TP rank 0
when that is not itself) and collects every rank's RankReport into one StepReport.

Who exchanges with the attention ranks: with one dense rank, the driver; with pipeline stages,
each stage for its own layers (PoolLink on each); with tensor parallel ranks, each stage's TP
rank 0 (the driver on stage 0) for every head of its stage (its TP ranks send it their heads'
q/k/v and get their slice of the merged partial).
An attention rank that dies or goes silent is marked failed and its requests are recomputed; a
dense rank that does stops the engine with an error naming it (restart it).

At start the driver ships each dense rank its slice of the weights it was given. On CUDA each
rank gets its own GPU and NCCL when there are enough GPUs, else all share the driver's GPU over
gloo with host-staged tensors (comm.place_ranks). On CUDA a dense rank's decode work between
attention exchanges (and TP all-reduces) replays CUDA graphs (segment_graphs); the exchanges,
all-reduces and the attention stay eager. With async scheduling
(`launch`) steps run on one runner thread while the engine schedules the next.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from fapool.attention.backend import AttentionBackend
from fapool.config import ConfigError, EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput
from fapool.layers.cpu_linear import pack_for_device
from fapool.layers.tp import check_tp, shard_layer_state
from fapool.worker import comm
from fapool.worker.background_steps import BackgroundSteps
from fapool.worker.dense_worker import (
    GROUP_TIMEOUT_S,
    DenseStage,
    send_weights,
    shard_model,
    stage_layers,
    tp_groups,
)
from fapool.worker.launcher import WorkerGroup, leave_cores_to_ranks, rank_devices
from fapool.worker.model_runner import ModelRunner, PendingTokens
from fapool.worker.pool_link import PoolLink, pool_kv_heads
from fapool.worker.pool_sparse import PoolSparse, SparseBatch, uses_triton
from fapool.worker.protocol import AttentionInit, DenseInit, DenseStep, RankReport, StepReport, Tag
from fapool.worker.step_plan import MicroBatchPlan, MicroBatchPolicy, plan_micro_batch, split_micro_batches

logger = logging.getLogger(__name__)


def check_parallel(config: EngineConfig) -> None:
    """What the multi-rank runner cannot serve, as ConfigError, before any process starts."""
    par, m = config.parallel, config.model
    check_tp(m, par.tensor_parallel_size)
    if par.pipeline_parallel_size > m.num_hidden_layers:
        raise ConfigError(
            f"pipeline_parallel_size {par.pipeline_parallel_size} exceeds the model's "
            f"{m.num_hidden_layers} layers: every stage needs at least one"
        )
    if not (config.device == "cpu" or config.device.startswith("cuda")):
        raise ConfigError(f"tensor/pipeline parallelism runs on cpu or cuda devices, not {config.device!r}")
    if config.sparse_attention and par.tensor_parallel_size * par.pipeline_parallel_size > 1:
        raise ConfigError(
            "sparse_attention with tensor_parallel_size / pipeline_parallel_size > 1 is not supported: "
            "the profile's per-head budgets are not cut to a rank's heads and layers"
        )


def rank_weights(
    model: torch.nn.Module, topology: comm.Topology, layer_ranges: list[range], rank: int
) -> dict[str, torch.Tensor]:
    """A dense rank's share of a whole model: replicated embeddings / norm / LM head / rotary
    table, and its stage's layers sliced for its TP rank. Names match its own sharded model."""
    tp = topology.tensor_parallel_size
    stage, tp_rank = topology.stage_of(rank), topology.tp_rank_of(rank)
    out: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith("model.layers."):
            out[name] = t.detach()
    for i in layer_ranges[stage]:
        for name, t in shard_layer_state(model.model.layers[i], tp_rank, tp).items():
            out[f"model.layers.{i}.{name}"] = t
    return out


def describe_dense_rank(topology: comm.Topology, rank: int) -> str:
    stage, tp_rank = topology.stage_of(rank), topology.tp_rank_of(rank)
    return f"dense worker rank {rank} (pipeline stage {stage}, tensor-parallel rank {tp_rank})"


def diagnose_dense_failure(
    topology: comm.Topology, procs: dict, error: BaseException, step: int
) -> comm.WorkerFailure | None:
    """The failure naming the dense rank behind a failed step; None when no dense rank is
    implicated (then the error is the driver's own, or an attention worker's, which the pool
    handles). `procs`: rank -> process, of every spawned rank."""
    blamed = comm.blame_rank({r: p for r, p in procs.items() if r < topology.num_dense}, error)
    if blamed is None:
        return None
    rank, why = blamed
    failure = comm.WorkerFailure(rank, f"step {step}", why)
    failure.args = (
        f"{describe_dense_rank(topology, rank)} {why}; "
        "the tensor/pipeline-parallel engine cannot continue (restart it)",
    )
    return failure


@dataclass
class _Step:
    """A step's plans, built before any rank is contacted."""

    out: SchedulerOutput
    index: int
    shape: tuple[int, int, int]  # (sequences, tokens, longest context): the micro-batch policy's key
    plans: list[MicroBatchPlan]
    dense: DenseStep
    plan_s: float
    # The requests whose next token the step computes, in logits order; taken when the step is
    # built, since launching it adds placeholders that change `completes_known_tokens`.
    due: list[ScheduledRequest]
    sparse: list[SparseBatch] | None = None  # the pool's sparse plans, one per micro-batch


class MultiRankRunner(ModelRunner):
    pack_cpu_linears = False  # packed once the weights are sharded (_start_workers)

    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> None:
        check_parallel(config)
        super().__init__(config, model, backend)
        self.use_cuda_graphs = False  # eager steps (module docstring)
        par, pool = config.parallel, config.pool
        self.topology = comm.Topology(par.tensor_parallel_size, par.pipeline_parallel_size, pool.attention_workers)
        # Ranks sharing the driver's GPU split its KV budget (ModelRunner.determine_num_blocks).
        self.rank_devices = rank_devices(config, self.topology.world_size)
        self.ranks_on_device = self.rank_devices.ranks_sharing(0)
        self.layer_ranges = stage_layers(config.model.num_hidden_layers, par.pipeline_parallel_size)
        self.timeout_s = pool.worker_timeout_s
        self._sharded = False  # the driver's model is whole until the ranks start (GPU profiling)
        self.pool_kv_heads = pool_kv_heads(config) if pool.attention_workers else None
        self.link: PoolLink | None = None
        if self.pool_kv_heads is not None:
            # A worker's block holds every layer and its KV heads (all of them but in head mode).
            self.worker_num_blocks = pool.worker_kv_blocks or ModelRunner.determine_num_blocks(
                self, ModelRunner.bytes_per_block(self)
            )
            self.pool_start = -(-pool.pool_threshold // self.block_size) * self.block_size
            if par.pipeline_parallel_size > 1:
                # A stage exchanges with the pool for its own layers, so it may wait out an
                # attention rank's timeout (each stage in turn) before it answers the driver.
                self.timeout_s *= 1 + par.pipeline_parallel_size
        # One stage: micro-batches overlap remote attention with dense work, their count chosen
        # per step; with stages, a micro-batch per stage fills the pipeline.
        pipelined = par.pipeline_parallel_size > 1 or self.pool_kv_heads is None
        self.micro_batches = MicroBatchPolicy(par.pipeline_parallel_size if pipelined else pool.micro_batches)
        self.step_stats: list[StepReport] = []
        self.fault_hang: dict[int, float] = {}  # tests: dense rank -> seconds to stall on its next step
        self.worker_fault_hang: dict[int, float] = {}  # tests: attention worker id -> seconds
        self.failure: comm.WorkerFailure | None = None
        self.waiter = comm.Waiter()
        self._step = 0
        self.background = BackgroundSteps()  # async scheduling
        self._stopped = False
        self.workers: WorkerGroup | None = None
        self.ray_pool = None  # RayPool: the attention workers are Ray actors (distributed_executor "ray")
        self.transport = "cpu"  # message buffers' device, known once the process group is up
        # Decided while the model is still whole (GPU profiling runs a full forward), for
        # the largest per-rank share of the KV, then the same block ids everywhere.
        self.num_blocks = ModelRunner.determine_num_blocks(self)
        if self.pool_kv_heads is not None and self.pool_start == 0:
            # Lamina (seed 004): every token's KV is on the attention ranks. The dense ranks
            # keep one block that nothing writes, so block tables stay uniform.
            self.num_blocks = 1
        self.stage = DenseStage(config, model, self.topology, 0, self._wait)
        if self.device.type == "cpu":
            leave_cores_to_ranks(self.topology.world_size - 1)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    # Start --------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        topo = self.topology
        startup_s = max(60.0, self.timeout_s)
        on_ray = self.config.parallel.distributed_executor == "ray"
        # On Ray the attention workers are actors with pair groups of their own (ray_pool).
        self.workers = WorkerGroup(self.config, topo.num_dense if on_ray else topo.world_size)
        self.transport = comm.transport_device(str(self.device))
        # Each stage's leader (TP rank 0) exchanges with the pool for the stage's layers; its
        # TP ranks go through it.
        leaders = [topo.dense_rank(s, 0) for s in range(1, topo.pipeline_parallel_size)]
        if self.pool_kv_heads is not None:
            self.link = PoolLink(
                self.config, topo, self.pool_kv_heads, self.device, self.transport, self.waiter, self.backend
            )
            self.stage.link = self.link
            if on_ray:
                from fapool.worker.ray_pool import RayPool  # Ray loads only for this executor

                self.ray_pool = RayPool(
                    self.config, self.pool_kv_heads, self.worker_num_blocks, self.link, leaders
                )
        stage_links = self.pool_kv_heads if leaders else None
        store = None
        if self.ray_pool is not None and leaders:  # where the stage leaders learn of joins
            store = (self.ray_pool.host, self.ray_pool.store.port)
        init = DenseInit(self.config, self.num_blocks, stage_links, store)
        for r in self._ranks():
            comm.send_object(init, r, self.waiter, startup_s, tag=Tag.INIT, device=self.transport)
        if self.pool_kv_heads is not None:
            for w, heads in self.pool_kv_heads.items() if not on_ray else ():
                msg = AttentionInit(self.config, w, self.worker_num_blocks, heads)
                comm.send_object(msg, topo.attention_rank(w), self.waiter, startup_s, tag=Tag.INIT, device=self.transport)
            if self.config.sparse_attention:  # the driver selects for every holder (pool_sparse)
                self.link.sparse = PoolSparse(
                    self.config,
                    self.num_blocks,
                    self.worker_num_blocks,
                    self.pool_kv_heads,
                    self.device,
                    self.dtype,
                    triton=uses_triton(self.backend),
                )
        groups = tp_groups(topo, GROUP_TIMEOUT_S)  # attention ranks next to TP ranks join in too
        if topo.num_dense > 1:
            with torch.no_grad():
                for r in self._ranks():
                    weights = rank_weights(self.model, topo, self.layer_ranges, r)
                    send_weights(weights, r, self.waiter, startup_s, self.transport)
                shard_model(self.model, self.stage, groups[0])
        pack_for_device(self.model, self.device)
        self._sharded = True

    def _ranks(self) -> range:
        """The dense ranks other than the driver."""
        return range(1, self.topology.num_dense)

    def _worker_ranks(self, live_only: bool = True) -> list[int]:
        if self.link is None:
            return []
        return [self.topology.attention_rank(w) for w in self.pool_kv_heads if not live_only or self.link.live(w)]

    def live_pool_workers(self) -> int:
        """Attention workers whose process is alive and that the driver has not given up on."""
        if self.ray_pool is not None:
            return self.ray_pool.num_live
        if self.workers is None:
            return 0
        return sum(1 for r in self._worker_ranks() if self.workers.alive(r))

    # KV cache -----------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.config.model
        heads = m.num_key_value_heads // self.topology.tensor_parallel_size
        layers = max(len(r) for r in self.layer_ranges)
        return 2 * layers * heads * m.head_dim * self.dtype.itemsize * self.block_size

    def determine_num_blocks(self) -> int:
        return self.num_blocks

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        if not self._sharded:  # GPU profiling of the whole model, before sharding
            super().allocate_kv_cache(num_blocks, dtype)
            return
        if num_blocks != self.num_blocks:
            raise ValueError(f"the dense ranks hold {self.num_blocks} KV blocks, not {num_blocks}")
        self.stage.allocate_kv_cache(num_blocks)
        self.kv_caches = self.stage.kv_caches

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.stage.copy_blocks(copies)

    # The step -----------------------------------------------------------------------------
    def _wait(self, work, peer: int, what: str, buf) -> None:
        self.waiter.wait(work, self.timeout_s, peer, what, buf)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        return self._run(self._prepare(out))

    def launch(self, out: SchedulerOutput) -> PendingTokens:
        """Run one step in the background (BackgroundSteps) and return at once: the engine
        schedules the next step meanwhile. Attention workers lost in a step are reported by
        take_failures() as in a synchronous one; the engine drops the lost requests' tokens
        (LLMEngine._drain)."""
        step = self._prepare(out)
        return self.background.launch(step.plans, step.due, lambda: self._run(step))

    def _prepare(self, out: SchedulerOutput) -> _Step:
        """The step's plans (host work on the scheduler's output; no rank is contacted)."""
        if self.failure is not None:
            raise self.failure
        self._step += 1
        t_plan = time.perf_counter()
        link = self.link
        sparse = None
        shape = (len(out.scheduled), out.num_tokens, max(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled))
        groups = split_micro_batches(out.scheduled, self.micro_batches.choose(*shape))
        if link is None:
            plans = [plan_micro_batch(g, self.block_size) for g in groups]
            plan = DenseStep(self._step, [p.dense() for p in plans], list(out.block_copies))
        else:
            mode = self.config.pool.pool_mode
            plans = [plan_micro_batch(g, self.block_size, self.pool_start, mode, i) for i, g in enumerate(groups)]
            if link.sparse is not None:  # marks the workers' sparse entries: before they are sent
                sparse = [link.sparse.plan(p, self.pool_start, shape[2]) for p in plans]
            failed = [w for w in self.pool_kv_heads if not link.live(w)]
            plan = DenseStep(self._step, [p.dense(with_routes=True) for p in plans], list(out.block_copies), failed)
        due = [s for s in out.scheduled if s.completes_known_tokens]
        return _Step(out, self._step, shape, plans, plan, time.perf_counter() - t_plan, due, sparse)

    def _run(self, step: _Step) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        try:
            return self._execute(step)
        except (comm.WorkerFailure, RuntimeError) as e:
            failure = diagnose_dense_failure(self.topology, self.workers.procs, e, step.index)
            if failure is None:
                raise
            self.failure = failure
            logger.error("%s", failure)
            raise failure from e

    def _execute(self, step: _Step) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        t_start = time.perf_counter()
        topo, link = self.topology, self.link
        out, shape, plans, plan = step.out, step.shape, step.plans, step.dense
        for r in self._ranks():
            if not self.workers.alive(r):
                raise comm.WorkerFailure(r, f"step {step.index}", "process exited")
        t_plan = time.perf_counter()
        if step.sparse is not None:  # here, not when planned: a launched step may still be running
            link.sparse.copy_blocks(out.block_copies, out.pool_block_copies)
            link.step_sparse = step.sparse
        stats = StepReport(step.index, out.num_tokens, len(plans))
        own = RankReport(0)
        told = self._send_pool_plans(plans, out) if link is not None else []
        stats.plan_s = step.plan_s + time.perf_counter() - t_plan

        t0 = time.perf_counter()
        for r in self._ranks():
            hang = self.fault_hang.pop(r, 0.0)
            msg = dataclasses.replace(plan, hang_s=hang) if hang else plan
            comm.send_object(msg, r, self.waiter, self.timeout_s, tag=Tag.STEP, device=self.transport)
        own.comm_s += time.perf_counter() - t0

        local = self.stage.run(plan, own)
        seconds = self.stage.last_seconds

        # The logits' receives are posted after this rank's hidden states went out: the last
        # stage sends them after receiving all of those (DenseStage.run, why: NCCL's order).
        t0 = time.perf_counter()
        last = topo.dense_rank(topo.pipeline_parallel_size - 1, 0)
        parts = [x for x in local if x is not None]
        if last != 0:
            vocab = self.config.model.vocab_size
            for i, mb in enumerate(plan.micro_batches):
                if mb.logit_rows:
                    buf = torch.empty(len(mb.logit_rows), vocab, dtype=torch.float32, device=self.transport)
                    self._wait(comm.recv_tensor(buf, last, Tag.LOGITS + i), last, "logits", buf)
                    parts.append(buf.to(self.device))
        for r in self._ranks():
            stats.ranks[r] = comm.recv_object(r, self.waiter, self.timeout_s, tag=Tag.REPORT, device=self.transport)
            for w, why in stats.ranks[r].failed_workers.items():
                link.fail(w, why)
        if link is not None:
            stats.workers = link.collect_reports(told)
            stats.local_attention_s = link.local_attention_s
        own.idle_s += time.perf_counter() - t0  # the pipeline draining, then the other ranks' reports

        logits = torch.cat(parts) if parts else None
        stats.ranks[0] = own
        stats.wait_s = seconds.get("wait", 0.0) + own.idle_s  # on attention ranks, or on other stages
        stats.tp_comm_s = seconds.get("comm", 0.0)  # all-reduces, hidden states, TP exchanges
        stats.dense_s = max(0.0, own.compute_s - stats.local_attention_s)
        stats.total_s = time.perf_counter() - t_start + step.plan_s
        self.micro_batches.record(*shape, len(plans), stats.total_s)
        self.step_stats.append(stats)
        return logits, step.due

    def _send_pool_plans(self, plans: list[MicroBatchPlan], out: SchedulerOutput) -> list[int]:
        """The attention ranks' plans, with the order the dense ranks send in: with one stage
        layer by layer, the micro-batches round-robin; with stages, stage by stage, each
        stage's micro-batches in turn, each through the stage's layers."""
        link, topo = self.link, self.topology
        if self.ray_pool is not None:  # the elastic pool grows onto workers that are not running yet
            self.ray_pool.ensure(w for p in plans for w in p.routes)
        for w in self.pool_kv_heads:
            if self.ray_pool is None and link.live(w) and not self.workers.alive(topo.attention_rank(w)):
                link.fail(w, "process exited")
        if topo.pipeline_parallel_size == 1:
            order = [(layer, i, 0) for layer in self.layer_ranges[0] for i in range(len(plans))]
        else:
            order = [
                (layer, i, topo.dense_rank(stage, 0))
                for stage, layers in enumerate(self.layer_ranges)
                for i in range(len(plans))
                for layer in layers
            ]
        return link.send_plans(self._step, plans, out.pool_block_copies, order, self.worker_fault_hang)

    def take_failures(self) -> list[tuple[int, str]]:
        """Attention workers lost (their requests are recomputed); a dense rank's failure is
        raised by execute()."""
        return self.link.take_failures() if self.link is not None else []

    def shutdown(self) -> None:
        """Stop every rank; safe to call twice. After a dense rank's failure (or a failed
        start) they are killed: the survivors may be blocked in an exchange that never ends."""
        if self._stopped:
            return
        self._stopped = True
        self.background.shutdown()
        if self.ray_pool is not None:
            self.ray_pool.shutdown()
        if self.workers is not None:
            if self.failure is not None or not self._sharded:
                self.workers.kill()
            else:
                workers = self._worker_ranks() if self.ray_pool is None else []
                self.workers.shutdown([*self._ranks(), *workers], self.waiter, self.transport)
        self.waiter.close()
