"""A dense rank of the static tensor/pipeline-parallel baseline: one pipeline stage's layers,
one tensor-parallel slice of their heads and FFN, and the KV cache of exactly those.

The driver (rank 0, stage 0, TP rank 0) owns the scheduler and the block manager; every
rank uses the same block ids, so a step plan is plain data sent to all. Per step, for each
micro-batch in order:

    stage 0:   ids -> embed -> its layers ------------------ hidden -> stage 1 (same TP rank)
    stage s:   hidden from stage s-1 -> its layers --------- hidden -> stage s+1
    last:      hidden from stage s-1 -> its layers -> norm - TP rank 0: logits of due rows -> rank 0

The TP ranks of a stage run the same micro-batches in the same order, so their all-reduces
pair up; sends are asynchronous, so stage s works on micro-batch i+1 while stage s+1 works
on micro-batch i (the pipeline fills within a step and drains at its end).

Devices (comm.place_ranks): on CPU, gloo. On CUDA with a GPU per rank, each rank on its own
GPU and NCCL for all-reduces and stage-to-stage sends; with fewer GPUs than ranks, all on one
GPU over gloo, every message and all-reduce staged through host memory. NCCL ignores message
tags and runs the sends and receives between two ranks in order on one stream, so every pair
of ranks here posts them in the same order on both sides (see DenseStage.run).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from fapool.attention.backend import merge_partials
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.selector import make_backend
from fapool.config import EngineConfig
from fapool.layers.tp import apply_tp
from fapool.models.llama import LocalAttend, Pending, run_steps
from fapool.models.registry import build_model
from fapool.worker import comm
from fapool.worker.model_runner import DTYPES
from fapool.worker.pool_link import PoolLink
from fapool.worker.protocol import SHUTDOWN, DenseInit, DenseStep, MicroBatch, RankReport, Tag, exchange_tag
from fapool.worker.step_clock import StepClock

logger = logging.getLogger(__name__)

GROUP_TIMEOUT_S = 7 * 24 * 3600.0  # deadlines are comm.Waiter's; gloo's own would close every pair


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


# wait(work, peer, what, buffer): block until a request completes, or raise WorkerFailure.
WaitFn = Callable[[object, int, str, torch.Tensor], None]


def blocking_wait(work, peer: int, what: str, _buf=None) -> None:
    comm.wait(work, peer, what)


class DenseStage:
    """One dense rank's share of the model and its KV cache; runs its part of a step."""

    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module | None,  # None until a worker's weights arrive
        topology: comm.Topology,
        rank: int,
        wait: WaitFn,
        device: str | None = None,  # this rank's device; default config.device (the driver)
    ) -> None:
        self.config = config
        self.model = model
        self.topology = topology
        self.rank = rank
        self.wait = wait
        self.device = torch.device(device or config.device)
        self.dtype = DTYPES[config.dtype]
        self.stage = topology.stage_of(rank)
        self.tp_rank = topology.tp_rank_of(rank)
        self.num_stages = topology.pipeline_parallel_size
        self.layers = stage_layers(config.model.num_hidden_layers, self.num_stages)[self.stage]
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.clock = StepClock(self.device)  # the step's waits, all-reduces included (new_clock)
        self.link: PoolLink | None = None  # a pipeline stage's link to the attention pool
        self._host: dict[torch.dtype, torch.Tensor] = {}  # pinned all-reduce buffers (staged)

    @property
    def transport(self) -> str:
        """Where this rank's messages live: its GPU under NCCL, else host memory."""
        return comm.transport_device(str(self.device))

    @property
    def staged(self) -> bool:
        """CUDA tensors over gloo: messages and all-reduces go through host memory."""
        return self.device.type == "cuda" and self.transport == "cpu"

    def new_clock(self) -> StepClock:
        self.clock = StepClock(self.device, stream_ordered=self.transport != "cpu")
        return self.clock

    def finish_clock(self, stats: RankReport, t_start: float) -> None:
        """Book the step: waits as communication or idle, the rest of its wall time (after
        the device has finished the step's work) as compute."""
        seconds = self.clock.finish()
        wall = time.perf_counter() - t_start
        # "wait": on attention ranks (a pipeline stage's own pool exchanges).
        comm_s, idle_s = seconds.get("comm", 0.0) + seconds.get("wait", 0.0), seconds.get("idle", 0.0)
        stats.comm_s += comm_s
        stats.idle_s += idle_s
        stats.compute_s += max(0.0, wall - comm_s - idle_s)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def computes_logits(self) -> bool:
        return self.is_last and self.tp_rank == 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        heads = m.num_key_value_heads // self.topology.tensor_parallel_size
        shape = (num_blocks, self.config.cache.block_size, heads, m.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in self.layers
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def all_reduce(self, group, peer: int) -> Callable[[torch.Tensor], None]:
        """The in-place sum used by the row-parallel hooks, timed as communication."""

        def reduce(t: torch.Tensor) -> None:
            if self.staged:
                self.clock.measure("comm", lambda: self._staged_all_reduce(t, group, peer))
            else:
                self.clock.measure(
                    "comm", lambda: self.wait(dist.all_reduce(t, group=group, async_op=True), peer, "all-reduce", t)
                )

        return reduce

    def _staged_all_reduce(self, t: torch.Tensor, group, peer: int) -> None:
        """gloo sums host memory: copy to a pinned buffer, all-reduce it, copy back. Both
        copies are synchronous, so the buffer is free for the next all-reduce on return."""
        flat = t.view(-1)
        host = self._host.get(t.dtype)
        if host is None or host.numel() < flat.numel():
            host = torch.empty(flat.numel(), dtype=t.dtype, pin_memory=True)
            self._host[t.dtype] = host
        host = host[: flat.numel()]
        host.copy_(flat)
        self.wait(dist.all_reduce(host, group=group, async_op=True), peer, "all-reduce", host)
        flat.copy_(host)

    def _recv_hidden(self, buf: torch.Tensor, prev: int, index: int) -> None:
        self.wait(comm.recv_tensor(buf, prev, Tag.HIDDEN + index), prev, "receive of hidden states", buf)

    def _wait_sends(self, sends: list[tuple[object, torch.Tensor, int]]) -> None:
        for work, buf, peer in sends:
            self.wait(work, peer, "send", buf)

    @torch.inference_mode()
    def run(self, plan: DenseStep, stats: RankReport) -> list[torch.Tensor | None]:
        """Run this rank's share of a step. Returns, per micro-batch, the due rows' logits when
        this rank computes them here and is rank 0 (the driver, pipeline size 1); other ranks
        send theirs. Outgoing sends are complete when this returns."""
        if self.link is None and self.config.pool.attention_workers > 0:  # TP next to a pool
            self._run_pooled(plan, stats)
            return [None] * len(plan.micro_batches)  # the driver computes the logits
        t_start = time.perf_counter()
        clock = self.new_clock()
        if self.link is not None:  # pipeline stages next to a pool: this stage's own exchanges
            self.link.known_failed(plan.failed_workers)
            self.link.begin_step(clock)
        self.copy_blocks(plan.copies)
        prev = self.topology.dense_rank(self.stage - 1, self.tp_rank) if not self.is_first else None
        nxt = self.topology.dense_rank(self.stage + 1, self.tp_rank) if not self.is_last else None
        hidden_size = self.config.model.hidden_size
        sends: list[tuple[object, torch.Tensor, int]] = []
        to_driver: list[tuple[int, torch.Tensor]] = []
        local_logits: list[torch.Tensor | None] = []
        for i, mb in enumerate(plan.micro_batches):
            stats.num_tokens += mb.num_tokens
            if self.is_first:
                x = torch.tensor(mb.input_ids, dtype=torch.long, device=self.device)
            else:
                buf = torch.empty(mb.num_tokens, hidden_size, dtype=self.dtype, device=self.transport)
                clock.measure("idle", lambda: self._recv_hidden(buf, prev, i))  # noqa: B023 - runs now
                x = buf.to(self.device)
            pos = torch.tensor(mb.positions, dtype=torch.long, device=self.device)
            meta = AttentionMetadata.build(device=self.device, **mb.meta_args)
            layers = self.model.model.layers
            if mb.routes:
                attend = self.link.attend_hook(mb.routes, mb.num_tokens, i, len(plan.micro_batches), meta, layers)
            else:
                attend = LocalAttend(layers, meta)
            hidden = run_steps(
                self.model.model.forward_steps(x, pos, self.kv_caches, attend, layers=self.layers)
            )
            logits = None
            if self.computes_logits and mb.logit_rows:
                rows = torch.tensor(mb.logit_rows, dtype=torch.long, device=self.device)
                logits = self.model.compute_logits(hidden.index_select(0, rows)).contiguous()
            if nxt is not None:
                msg = hidden.to(self.transport)
                sends.append((comm.send_tensor(msg, nxt, Tag.HIDDEN + i), msg, nxt))
            elif logits is not None and self.rank != 0:
                to_driver.append((i, logits))
            local_logits.append(logits if self.rank == 0 else None)
        # The logits go to the driver after every hidden state has arrived, not per micro-
        # batch: with two stages the driver is also this rank's previous stage, it sends all
        # its hidden states before it receives logits, and under NCCL the traffic between two
        # ranks runs in posting order on one stream, so interleaving would deadlock.
        for i, logits in to_driver:
            msg = logits.to(self.transport)
            sends.append((comm.send_tensor(msg, 0, Tag.LOGITS + i), msg, 0))
        clock.measure("comm", lambda: self._wait_sends(sends))
        if self.link is not None:
            clock.measure("wait", self.link.finish_sends)
            if self.rank != 0:  # the driver's own link reports to the engine directly
                stats.failed_workers = dict(self.link.take_failures())
        self.finish_clock(stats, t_start)
        return local_logits

    def _run_pooled(self, plan: DenseStep, stats: RankReport) -> None:
        """A TP rank's share of a step next to an attention pool (fapool.worker.tp_pool): its
        heads' attention over its local blocks here; for micro-batches with remote attention,
        its q/k/v go to the driver and the pool's partial for its heads comes back."""
        t_start = time.perf_counter()
        clock = self.new_clock()
        self.copy_blocks(plan.copies)
        sends: list = []
        gens = []
        for i, mb in enumerate(plan.micro_batches):
            stats.num_tokens += mb.num_tokens
            ids = torch.tensor(mb.input_ids, dtype=torch.long, device=self.device)
            pos = torch.tensor(mb.positions, dtype=torch.long, device=self.device)
            meta = AttentionMetadata.build(device=self.device, **mb.meta_args)
            attend = _RankAttend(self, meta, mb, i, len(plan.micro_batches), sends)
            gens.append(self.model.model.forward_steps(ids, pos, self.kv_caches, attend, layers=self.layers))
        drive_micro_batches(gens)
        clock.measure("comm", lambda: [self.wait(work, 0, "send of q/k/v", buf) for work, buf in sends])
        self.finish_clock(stats, t_start)


class _RankAttend:
    """A TP rank's attend hook next to an attention pool (DenseStage._run_pooled)."""

    def __init__(self, stage: DenseStage, meta: AttentionMetadata, mb: MicroBatch, index: int, count: int, sends: list):
        self.stage = stage
        self.meta = meta
        self.remote = mb.remote
        self.index = index
        self.count = count
        self.sends = sends  # (request, buffer kept alive) of the step's q/k/v sends

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        attn = self.stage.model.model.layers[layer].self_attn
        T, hq, D = q.shape
        tag = exchange_tag(layer, self.index, self.count)
        if self.remote:
            msg = torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]).to(self.stage.transport)
            self.sends.append((comm.send_tensor(msg, 0, tag), msg))
        k_cache, v_cache = kv_cache
        attn.backend.write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        out, lse = attn.backend.forward(q, k_cache, v_cache, self.meta, attn.scale)
        if not self.remote:
            return Pending(finish=lambda: out)  # still yield: the driver's order, layer by layer

        def finish() -> torch.Tensor:
            # Received only now, after the other micro-batches' q/k/v went out: under NCCL a
            # pair's transfers run in posting order, and the driver posts in this order.
            buf = torch.empty(T * hq * (D + 1), dtype=torch.float32, device=self.stage.transport)
            self.stage.clock.measure("comm", lambda: self._receive(buf, tag + 1))
            buf = buf.to(self.stage.device)
            o, l = buf[: T * hq * D].view(T, hq, D), buf[T * hq * D :].view(T, hq)
            merged, _ = merge_partials([out.float(), o], [lse, l])
            return merged.to(q.dtype)

        return Pending(finish=finish)

    def _receive(self, buf: torch.Tensor, tag: int) -> None:
        self.stage.wait(comm.recv_tensor(buf, 0, tag), 0, "attention partials from the driver", buf)


def drive_micro_batches(gens) -> list[torch.Tensor]:
    """Run micro-batch generators round-robin until all return; results in order. Every
    attend hook with remote attention yields once per layer, so micro-batches advance layer
    by layer in a fixed order on every dense rank, which keeps their all-reduces paired."""
    results: list = [None] * len(gens)
    active = list(range(len(gens)))
    while active:
        for i in list(active):
            try:
                next(gens[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results


def tp_groups(topology: comm.Topology, timeout_s: float) -> list:
    """One process group per pipeline stage over its TP ranks. Every rank must create every
    group, in the same order (torch.distributed's rule), even those it is not in."""
    if topology.tensor_parallel_size == 1:
        return [None] * topology.pipeline_parallel_size
    return [
        dist.new_group(
            [topology.dense_rank(s, t) for t in range(topology.tensor_parallel_size)],
            timeout=dt.timedelta(seconds=timeout_s),
        )
        for s in range(topology.pipeline_parallel_size)
    ]


def shard_model(model: nn.Module, stage: DenseStage, group) -> None:
    """Cut a whole model down to a rank's share: TP-slice its stage's layers (all-reduce
    through `stage.all_reduce`) and drop the other stages' layers."""
    tp = stage.topology.tensor_parallel_size
    peer = stage.topology.dense_rank(stage.stage, (stage.tp_rank + 1) % tp)
    apply_tp(model, stage.tp_rank, tp, group, all_reduce=stage.all_reduce(group, peer), layers=stage.layers)
    blocks = model.model.layers
    for i in range(len(blocks)):
        if i not in stage.layers:
            blocks[i] = nn.Module()  # placeholder: indices stay global


def send_weights(
    tensors: dict[str, torch.Tensor], dst: int, waiter: comm.Waiter, timeout_s: float, transport: str = "cpu"
) -> None:
    """Names, shapes and dtypes first, then each tensor (through `transport`)."""
    specs = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors.items()]
    comm.send_object(specs, dst, waiter, timeout_s, tag=Tag.WEIGHTS, device=transport)
    pending = []
    for t in tensors.values():
        t = t.to(transport).contiguous()
        pending.append((comm.send_tensor(t, dst, Tag.WEIGHTS + 2), t))
    for work, t in pending:
        waiter.wait(work, timeout_s, dst, "weight transfer", t)


def receive_weights(model: nn.Module, transport: str) -> None:
    """Fill a materialised (to_empty) model with the driver's tensors; every parameter and
    buffer must arrive, with the shape this rank's shard expects. `transport`: where the
    messages land (comm.transport_device)."""
    specs = comm.recv_object(0, None, tag=Tag.WEIGHTS, device=transport)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    names = [name for name, _, _ in specs]
    if set(names) != set(targets):
        missing, extra = sorted(set(targets) - set(names)), sorted(set(names) - set(targets))
        raise RuntimeError(f"weight transfer mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape, _dtype in specs:
        target = targets[name]
        if tuple(target.shape) != shape:
            raise RuntimeError(
                f"weight {name}: driver sent {shape}, this shard expects {tuple(target.shape)}"
            )
        buf = torch.empty(shape, dtype=target.dtype, device=transport)
        comm.wait(comm.recv_tensor(buf, 0, Tag.WEIGHTS + 2), 0, "weight transfer")
        with torch.no_grad():
            target.copy_(buf)


class DenseWorker:
    """A non-driver dense rank: builds its shard, then follows the driver's step plans."""

    def __init__(self, init: DenseInit, rank: int, device: str) -> None:
        cfg = init.config
        self.rank = rank
        par = cfg.parallel
        self.topology = comm.Topology(
            par.tensor_parallel_size, par.pipeline_parallel_size, cfg.pool.attention_workers
        )
        groups = tp_groups(self.topology, GROUP_TIMEOUT_S)
        self.stage = DenseStage(cfg, None, self.topology, rank, blocking_wait, device)
        self.transport = self.stage.transport
        backend = make_backend(cfg.attention_backend, device)
        # Shapes only until the weights arrive: a rank never holds more than its shard.
        model = build_model(cfg.model, backend, DTYPES[cfg.dtype], "meta")
        shard_model(model, self.stage, groups[self.stage.stage])
        model.to_empty(device=device)
        if cfg.model.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        receive_weights(model, self.transport)
        if self.stage.device.type == "cuda":
            # The same fused norm / rotary / activation kernels as the driver's model
            # (ModelRunner fuses it on CUDA), so every rank rounds alike.
            from fapool.layers.fused import fuse_model

            fuse_model(model)
        self.stage.model = model.eval()
        self.stage.allocate_kv_cache(init.num_blocks)
        if init.pool_kv_heads is not None:  # a pipeline stage next to an attention pool
            self.stage.link = PoolLink(
                cfg, self.topology, init.pool_kv_heads, self.stage.device, self.transport, comm.Waiter(), backend
            )

    def run(self) -> None:
        idle_since = time.perf_counter()
        while True:
            msg = comm.recv_object(0, None, tag=Tag.STEP, device=self.transport)
            if msg == SHUTDOWN:
                return
            stats = RankReport(self.rank, idle_s=time.perf_counter() - idle_since)
            if msg.hang_s:
                time.sleep(msg.hang_s)
            self.stage.run(msg, stats)
            comm.send_object(stats, 0, None, tag=Tag.REPORT, device=self.transport)
            idle_since = time.perf_counter()


def dense_worker_main(init: DenseInit, rank: int, device: str) -> None:
    try:
        DenseWorker(init, rank, device).run()
    except (comm.WorkerFailure, RuntimeError) as e:
        # A peer or the driver went away: nothing left to serve.
        logger.warning("dense worker rank %d stopping: %s", rank, e)
