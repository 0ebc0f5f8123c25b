"""The dense role: one pipeline stage's layers, one tensor-parallel slice of their heads and
FFN, and the local KV cache of exactly those (the driver is the dense rank of stage 0, TP rank
0). Next to an attention pool a rank's layers attend the pool's KV through a PoolLink (its own,
or with TP ranks the driver's, which gathers their heads' q/k/v).

The driver (rank 0, stage 0, TP rank 0) owns the scheduler and the block manager; every
rank uses the same block ids, so a step plan is plain data sent to all. Per step, for each
micro-batch in order:

    stage 0:   ids -> embed -> its layers ------------------ hidden -> stage 1 (same TP rank)
    stage s:   hidden from stage s-1 -> its layers --------- hidden -> stage s+1
    last:      hidden from stage s-1 -> its layers -> norm - TP rank 0: logits of due rows -> rank 0

The TP ranks of a stage run the same micro-batches in the same order, so their all-reduces
pair up; sends are asynchronous, so stage s works on micro-batch i+1 while stage s+1 works
on micro-batch i (the pipeline fills within a step and drains at its end). With one stage the
micro-batches advance round-robin, one layer per turn, so that one's remote attention runs
beside another's dense work.

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

from fapool.attention.backend import merge_partials, merge_tree
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.selector import make_backend
from fapool.config import EngineConfig
from fapool.layers.cpu_linear import pack_for_device
from fapool.layers.tp import AllReduce, apply_tp
from fapool.models.llama import LocalAttend, Pending, run_steps
from fapool.models.registry import build_model
from fapool.worker import comm
from fapool.worker.kv_tensors import allocate_kv, copy_kv_blocks
from fapool.worker.model_runner import DTYPES
from fapool.worker.pool_link import PoolAttend, PoolLink
from fapool.worker.protocol import SHUTDOWN, DenseInit, DenseStep, MicroBatch, RankReport, Tag, exchange_tag
from fapool.worker.segment_graphs import SegmentGraphs
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
        self.link: PoolLink | None = None  # this rank's own link to the attention pool
        self._sends: list = []  # the step's outgoing sends, waited for at its end
        self.last_seconds: dict[str, float] = {}  # the last step's seconds per clock kind
        self._host: dict[torch.dtype, torch.Tensor] = {}  # pinned all-reduce buffers (staged)
        # Decode micro-batches replay CUDA graphs between exchanges and all-reduces (segment_graphs).
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.graphs: SegmentGraphs | None = None
        self.tp_all_reduce: AllReduce | None = None  # set by shard_model on a TP rank

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

    def finish_clock(self, stats: RankReport, t_start: float) -> dict[str, float]:
        """Book the step: waits as communication or idle, the rest of its wall time (after
        the device has finished the step's work) as compute. Returns the seconds per kind."""
        seconds = self.clock.finish()
        wall = time.perf_counter() - t_start
        # "wait": on attention ranks (a pipeline stage's own pool exchanges).
        comm_s, idle_s = seconds.get("comm", 0.0) + seconds.get("wait", 0.0), seconds.get("idle", 0.0)
        stats.comm_s += comm_s
        stats.idle_s += idle_s
        stats.compute_s += max(0.0, wall - comm_s - idle_s)
        self.last_seconds = seconds
        return seconds

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
        self.kv_caches = allocate_kv(len(self.layers), shape, self.dtype, self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        copy_kv_blocks(self.kv_caches, copies, self.device)

    def all_reduce(self, group, peer: int) -> Callable[[torch.Tensor], None]:
        """The in-place sum used by the row-parallel hooks, timed as communication."""

        def reduce(t: torch.Tensor) -> None:
            if self.staged:
                self.clock.measure("comm", lambda: self._staged_all_reduce(t, group, peer))
            else:
                self.clock.measure(
                    "comm", lambda: self.wait(comm.all_reduce(t, group), peer, "all-reduce", t)
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
        self.wait(comm.all_reduce(host, group), peer, "all-reduce", host)
        flat.copy_(host)

    def _recv_hidden(self, buf: torch.Tensor, prev: int, index: int) -> None:
        self.wait(comm.recv_tensor(buf, prev, Tag.HIDDEN + index), prev, "receive of hidden states", buf)

    def _wait_sends(self, sends: list[tuple[object, torch.Tensor, int]]) -> None:
        for work, buf, peer in sends:
            self.wait(work, peer, "send", buf)

    @torch.inference_mode()
    def run(self, plan: DenseStep, stats: RankReport) -> list[torch.Tensor | None]:
        """Run this rank's share of a step. Returns, per micro-batch, the due rows' logits when
        this rank computes them and is rank 0 (the driver); a last stage elsewhere sends them
        to the driver. Outgoing sends are complete when this returns. With one stage the
        micro-batches advance layer by layer, round-robin (one's remote attention overlaps
        another's dense work; the TP ranks' all-reduces pair up); with several, each runs
        through this stage's layers in turn and flows on to the next stage."""
        t_start = time.perf_counter()
        clock = self.new_clock()
        if self.link is not None:
            self.link.known_failed(plan.failed_workers)
            self.link.begin_step(clock, (w for mb in plan.micro_batches for w in mb.routes or {}))
        self.copy_blocks(plan.copies)
        prev = self.topology.dense_rank(self.stage - 1, self.tp_rank) if not self.is_first else None
        nxt = self.topology.dense_rank(self.stage + 1, self.tp_rank) if not self.is_last else None
        hidden_size = self.config.model.hidden_size
        count = len(plan.micro_batches)
        self._sends: list[tuple[object, torch.Tensor, int]] = []  # (request, buffer, peer)
        to_driver: list[tuple[int, torch.Tensor]] = []
        local_logits: list[torch.Tensor | None] = [None] * count

        def forward(i: int, mb: MicroBatch, x: torch.Tensor):
            pos = torch.tensor(mb.positions, dtype=torch.long, device=self.device)
            meta = AttentionMetadata.build(device=self.device, **mb.meta_args)
            attend = self._attend_hook(mb, i, count, meta)
            graphs = self._graphs_for(mb)
            if graphs is not None:
                return graphs.steps(i, x, pos, self.kv_caches, attend)
            return self.model.model.forward_steps(x, pos, self.kv_caches, attend, layers=self.layers)

        def due_rows(mb: MicroBatch, hidden: torch.Tensor) -> torch.Tensor | None:
            if not (self.computes_logits and mb.logit_rows):
                return None
            return hidden.index_select(0, torch.tensor(mb.logit_rows, dtype=torch.long, device=self.device))

        def finish(i: int, mb: MicroBatch, hidden: torch.Tensor, logits: torch.Tensor | None) -> None:
            if nxt is not None:
                msg = hidden.to(self.transport)
                self._sends.append((comm.send_tensor(msg, nxt, Tag.HIDDEN + i), msg, nxt))
            elif logits is not None and self.rank != 0:
                to_driver.append((i, logits))
            if self.rank == 0:
                local_logits[i] = logits

        for mb in plan.micro_batches:
            stats.num_tokens += mb.num_tokens
        if self.num_stages == 1:
            gens = [
                forward(i, mb, torch.tensor(mb.input_ids, dtype=torch.long, device=self.device))
                for i, mb in enumerate(plan.micro_batches)
            ]
            hiddens = drive_micro_batches(gens)
            # One LM-head pass for every micro-batch's due rows: on a CPU the head's weights are
            # the largest read of the step, and at the step's end nothing else runs beside it.
            due = [due_rows(mb, h) for mb, h in zip(plan.micro_batches, hiddens)]
            rows = [d for d in due if d is not None]
            logits = self.model.compute_logits(torch.cat(rows)).split([len(d) for d in rows]) if rows else []
            parts = iter(logits)
            for i, (mb, hidden, d) in enumerate(zip(plan.micro_batches, hiddens, due)):
                finish(i, mb, hidden, None if d is None else next(parts).contiguous())
        else:
            for i, mb in enumerate(plan.micro_batches):
                if self.is_first:
                    x = torch.tensor(mb.input_ids, dtype=torch.long, device=self.device)
                else:
                    buf = torch.empty(mb.num_tokens, hidden_size, dtype=self.dtype, device=self.transport)
                    clock.measure("idle", lambda: self._recv_hidden(buf, prev, i))  # noqa: B023 - runs now
                    x = buf.to(self.device)
                hidden = run_steps(forward(i, mb, x))
                d = due_rows(mb, hidden)
                finish(i, mb, hidden, None if d is None else self.model.compute_logits(d).contiguous())
        # The logits go to the driver after every hidden state has arrived, not per micro-
        # batch: with two stages the driver is also this rank's previous stage, it sends all
        # its hidden states before it receives logits, and under NCCL the traffic between two
        # ranks runs in posting order on one stream, so interleaving would deadlock.
        for i, logits in to_driver:
            msg = logits.to(self.transport)
            self._sends.append((comm.send_tensor(msg, 0, Tag.LOGITS + i), msg, 0))
        clock.measure("comm", lambda: self._wait_sends(self._sends))
        if self.link is not None:
            clock.measure("wait", self.link.finish_sends)
            if self.rank != 0:  # the driver's own link reports to the engine directly
                stats.failed_workers = dict(self.link.take_failures())
        self.finish_clock(stats, t_start)
        return local_logits

    def _graphs_for(self, mb: MicroBatch) -> SegmentGraphs | None:
        """The segment graphs, for a decode micro-batch (one token per row) that fits them."""
        if not self.use_graphs or any(n != 1 for n in mb.meta_args["query_lens"]):
            return None
        if self.graphs is None:
            sched = self.config.scheduler
            self.graphs = SegmentGraphs(
                self.model, self.layers, sched.max_num_seqs, self.device, self.dtype, self.tp_all_reduce
            )
        return self.graphs if self.graphs.padded_size(mb.num_tokens) is not None else None

    def _attend_hook(self, mb: MicroBatch, index: int, count: int, meta: AttentionMetadata):
        """Who attends a micro-batch's layers on this rank: the local KV only; this rank's own
        exchange with the attention ranks (its layers, every head); or, tensor parallel next
        to a pool, the driver's exchange on behalf of every TP rank's heads."""
        layers = self.model.model.layers
        tp = self.topology.tensor_parallel_size
        if self.config.pool.attention_workers and tp > 1:
            if self.tp_rank == 0:
                return _LeaderTPPoolAttend(self, mb.routes or {}, mb.num_tokens, index, count, meta)
            return _RankAttend(self, meta, mb, index, count)
        if self.link is not None:  # also with nothing remote: the link's backend, and a yield
            return self.link.attend_hook(mb.routes or {}, mb.num_tokens, index, count, meta, layers)
        return LocalAttend(layers, meta)


class _RankAttend:
    """A TP rank's attend hook next to an attention pool: its heads' attention over its local
    blocks here; for a micro-batch with remote attention its q/k/v go to its stage's leader (TP
    rank 0: the driver on stage 0), and the pool's merged partial for its heads comes back to be
    merged with the local one."""

    def __init__(self, stage: DenseStage, meta: AttentionMetadata, mb: MicroBatch, index: int, count: int):
        self.stage = stage
        self.meta = meta
        self.remote = mb.remote
        self.index = index
        self.count = count
        self.leader = stage.topology.dense_rank(stage.stage, 0)

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        stage = self.stage
        attn = stage.model.model.layers[layer].self_attn
        T, hq, D = q.shape
        tag = exchange_tag(layer, self.index, self.count)
        if self.remote:
            msg = torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]).to(stage.transport)
            stage._sends.append((comm.send_tensor(msg, self.leader, tag), msg, self.leader))
        k_cache, v_cache = kv_cache
        attn.backend.write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        out, lse = attn.backend.forward(q, k_cache, v_cache, self.meta, attn.scale)
        if not self.remote:
            return Pending(finish=lambda: out)  # still yield: the driver's order, layer by layer

        def finish() -> torch.Tensor:
            # Received only now, after the other micro-batches' q/k/v went out: under NCCL a
            # pair's transfers run in posting order, and the leader posts in this order.
            buf = torch.empty(T * hq * (D + 1), dtype=torch.float32, device=stage.transport)
            stage.clock.measure("comm", lambda: self._receive(buf, tag + 1))
            buf = buf.to(stage.device)
            o, l = buf[: T * hq * D].view(T, hq, D), buf[T * hq * D :].view(T, hq)
            merged, _ = merge_partials([out.float(), o], [lse, l])
            return merged.to(q.dtype)

        return Pending(finish=finish)

    def _receive(self, buf: torch.Tensor, tag: int) -> None:
        self.stage.wait(
            comm.recv_tensor(buf, self.leader, tag), self.leader, "attention partials from the stage leader", buf
        )


class _LeaderTPPoolAttend(PoolAttend):
    """A stage leader's hook (TP rank 0: the driver on stage 0) with tensor-parallel ranks
    beside a pool: it gathers every head's q/k/v of its stage for the pool (the workers keep
    one peer per layer, every head), exchanges with the workers, and sends each TP rank its
    heads' slice of the pool's merged partial. The merge is exact per head, so merging the
    pool's partials here and each rank's local one there changes only rounding. The price: one
    message in and one out per TP rank and layer."""

    def __init__(self, stage: DenseStage, routes, num_tokens: int, index: int, count: int, meta) -> None:
        super().__init__(stage.link, routes, num_tokens, index, count, meta, stage.model.model.layers)
        self.stage = stage
        topo = stage.topology
        self.tp_ranks = [(t, topo.dense_rank(stage.stage, t)) for t in range(1, topo.tensor_parallel_size)]

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        if not self.cuts:  # all local: every rank attends its heads on its own
            return super().__call__(layer, q, k, v, kv_cache)
        tag = exchange_tag(layer, self.index, self.count)
        full = self._gather(q, k, v, tag)
        recvs = self.post_remote(layer, *full)
        out, lse = self.attend_local(layer, q, k, v, kv_cache)
        return Pending(finish=lambda: self._merge_and_scatter(full[0].shape, q, out, lse, recvs, tag))

    def _gather(self, q, k, v, tag: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stage = self.stage
        T, hq, D = q.shape
        hkv = k.shape[1]
        sizes = [T * hq * D, T * hkv * D, T * hkv * D]
        posted = []
        for _, rank in self.tp_ranks:
            buf = torch.empty(sum(sizes), dtype=q.dtype, device=stage.transport)
            posted.append((rank, comm.recv_tensor(buf, rank, tag), buf))
        qs, ks, vs = [q], [k], [v]
        for rank, work, buf in posted:
            stage.clock.measure("comm", lambda: stage.wait(work, rank, "q/k/v exchange", buf))  # noqa: B023
            bq, bk, bv = buf.to(stage.device).split(sizes)
            qs.append(bq.view(T, hq, D))
            ks.append(bk.view(T, hkv, D))
            vs.append(bv.view(T, hkv, D))
        # TP rank t holds q heads t*H/tp.. and KV heads t*Hkv/tp.. (layers/tp.py): in rank
        # order the slices are the global head order the workers' head indices use.
        return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)

    def _merge_and_scatter(self, shape, q, out, lse, recvs, tag: int) -> torch.Tensor:
        stage = self.stage
        T, H, D = shape
        outs, lses = self.remote_partials(shape, recvs)
        if outs:
            pool_o, pool_l = merge_tree(outs, lses)
        else:  # no worker answered (none had queries here, or they failed): an empty partial
            pool_o = torch.zeros(T, H, D, dtype=torch.float32, device=stage.device)
            pool_l = torch.full((T, H), float("-inf"), dtype=torch.float32, device=stage.device)
        hq = q.shape[1]
        for t, rank in self.tp_ranks:
            heads = slice(t * hq, (t + 1) * hq)
            msg = torch.cat([pool_o[:, heads].reshape(-1), pool_l[:, heads].reshape(-1)]).to(stage.transport)
            stage._sends.append((comm.send_tensor(msg, rank, tag + 1), msg, rank))
        merged, _ = merge_partials([out.float(), pool_o[:, :hq]], [lse, pool_l[:, :hq]])
        return merged.to(q.dtype)


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
    if tp > 1:
        stage.tp_all_reduce = stage.all_reduce(group, peer)
        apply_tp(model, stage.tp_rank, tp, group, all_reduce=stage.tp_all_reduce, layers=stage.layers)
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
        pack_for_device(model, self.stage.device)
        self.stage.model = model.eval()
        self.stage.allocate_kv_cache(init.num_blocks)
        if init.pool_kv_heads is not None and self.stage.tp_rank == 0:  # a stage leader next to a pool
            self.stage.link = PoolLink(
                cfg, self.topology, init.pool_kv_heads, self.stage.device, self.transport, comm.Waiter(), backend
            )
            if init.pool_store is not None:  # the pool's workers are Ray actors, joining as it grows
                from fapool.worker.ray_pool import StagePairs  # Ray loads only for this executor

                self.pool_pairs = StagePairs(self.stage.link, *init.pool_store, rank)

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
