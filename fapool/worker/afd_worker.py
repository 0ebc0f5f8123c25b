"""Attention-FFN disaggregation (seed 002; Step-3, MegaScale-Infer): `r` attention ranks each
own a share of the running requests (their KV, attention, the attention block's projections,
embeddings and LM head) and `f` FFN ranks run every layer's FFN for all of them, each a
tensor-parallel slice (gate/up by rows, down by columns). Per layer and micro-batch:

    attention rank a:  attention -> o_proj -> + residual -> norm --h--> every FFN rank
    FFN rank j:        h of every attention rank, concatenated -> its FFN slice --y_j--> each a
    attention rank a:  x + sum_j y_j -> the next layer

Ranks: attention ranks 0..r-1 (rank 0 is the driver: the scheduler, the block manager and its
own share of the requests), then FFN ranks r..r+f-1. The block ids are cut into r equal
partitions, one per attention rank (BlockPool partitions): a request's rank is the partition
of its blocks, so its KV never moves.

Ping-pong: every attention rank cuts its requests into the same number of micro-batches, whose
layers advance round-robin, so one's attention runs while the FFN ranks work on another's
hidden states. The count comes from measured step times (MicroBatchPolicy) unless fixed.
Every (attention, FFN) pair posts its transfers in mirrored order, as NCCL needs (it ignores
tags): the attention side sends h(0, i) for each of its micro-batches i, then for each later
layer l and each i receives y(l-1, i) and sends h(l, i), and at the end receives y(L-1, i).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from fapool.attention.metadata import AttentionMetadata
from fapool.attention.selector import make_backend
from fapool.config import EngineConfig, ModelConfig
from fapool.layers.cpu_linear import pack_for_device
from fapool.layers.tp import shard_linear
from fapool.models.llama import MLP, LocalAttend, Pending
from fapool.models.registry import build_model
from fapool.worker import comm
from fapool.worker.dense_worker import blocking_wait, drive_micro_batches, receive_weights
from fapool.worker.kv_tensors import allocate_kv, copy_kv_blocks
from fapool.worker.model_runner import DTYPES
from fapool.worker.protocol import SHUTDOWN, AFDInit, AFDStep, MicroBatch, RankReport, Tag, exchange_tag
from fapool.worker.step_clock import StepClock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AFDTopology:
    attention_ranks: int
    ffn_ranks: int

    @property
    def world_size(self) -> int:
        return self.attention_ranks + self.ffn_ranks

    @property
    def ffn_rank_ids(self) -> range:
        return range(self.attention_ranks, self.world_size)

    def describe(self, rank: int) -> str:
        if rank < self.attention_ranks:
            return f"AFD attention rank {rank}"
        return f"AFD FFN rank {rank} (FFN slice {rank - self.attention_ranks} of {self.ffn_ranks})"


def afd_topology(config: EngineConfig) -> AFDTopology:
    par = config.parallel
    return AFDTopology(par.afd_attention_ranks or 0, par.afd_ffn_ranks or 0)


# Weights -------------------------------------------------------------------------------------
_MLP_LINEARS = (("gate_up_proj", "column"), ("up_proj", "column"), ("down_proj", "row"))


def mlp_slice(mlp: nn.Module, index: int, count: int) -> dict[str, torch.Tensor]:
    """FFN rank `index` of `count`'s slice of one MLP's parameters (names relative to it)."""
    out = {}
    for name, style in _MLP_LINEARS:
        linear = getattr(mlp, name, None)
        if linear is not None:
            for p, t in shard_linear(linear, style, index, count).items():
                out[f"{name}.{p}"] = t
    return out


def ffn_layers(config: ModelConfig, ffn_ranks: int, dtype: torch.dtype, device: str) -> nn.ModuleList:
    """An FFN rank's model: every layer's MLP with 1/ffn_ranks of the intermediate size."""
    cfg = dataclasses.replace(config, intermediate_size=config.intermediate_size // ffn_ranks)
    with torch.device(device):
        layers = nn.ModuleList(MLP(cfg) for _ in range(config.num_hidden_layers))
    return layers.to(dtype).eval()


def attention_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an attention rank holds: the whole model but its MLPs."""
    return {
        name: t.detach()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if ".mlp." not in name
    }


def drop_mlps(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.mlp = nn.Module()


# The attention side --------------------------------------------------------------------------
class AttentionSide:
    """An attention rank's requests: its model without MLPs, its partition's KV, and its part
    of a step (the driver is attention rank 0)."""

    def __init__(self, config: EngineConfig, model: nn.Module, topology: AFDTopology, rank: int, device, wait) -> None:
        self.config = config
        self.model = model
        self.topology = topology
        self.rank = rank
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.wait = wait
        self.transport = comm.transport_device(str(self.device))
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.clock = StepClock(self.device)
        self._sends: list[tuple[object, torch.Tensor, int]] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        shape = (num_blocks, self.config.cache.block_size, m.num_key_value_heads, m.head_dim)
        self.kv_caches = allocate_kv(m.num_hidden_layers, shape, self.dtype, self.device)

    @torch.inference_mode()
    def run(self, step: AFDStep, stats: RankReport) -> torch.Tensor | None:
        """Run this rank's micro-batches; returns the logits of their due rows in order (None:
        none due), through one LM head pass. A rank other than the driver sends them to it."""
        t_start = time.perf_counter()
        self.clock = StepClock(self.device, stream_ordered=self.transport != "cpu")
        self._sends = []
        copy_kv_blocks(self.kv_caches, step.copies, self.device)
        count = len(step.micro_batches)
        gens = [self._forward(i, mb, count) for i, mb in enumerate(step.micro_batches) if mb.num_tokens]
        hidden = iter(drive_micro_batches(gens))
        due = []
        for mb in step.micro_batches:
            stats.num_tokens += mb.num_tokens
            h = next(hidden) if mb.num_tokens else None
            if h is not None and mb.logit_rows:
                due.append(h.index_select(0, torch.tensor(mb.logit_rows, dtype=torch.long, device=self.device)))
        logits = self.model.compute_logits(torch.cat(due)).contiguous() if due else None
        if self.rank != 0 and logits is not None:
            msg = logits.to(self.transport)
            self._sends.append((comm.send_tensor(msg, 0, Tag.LOGITS), msg, 0))
        self.clock.measure("comm", self._wait_sends)
        seconds = self.clock.finish()
        wall = time.perf_counter() - t_start
        stats.comm_s += seconds.get("comm", 0.0)
        stats.idle_s += seconds.get("wait", 0.0)  # waiting for the FFN ranks
        stats.compute_s += max(0.0, wall - seconds.get("comm", 0.0) - seconds.get("wait", 0.0))
        return logits

    def _forward(self, index: int, mb: MicroBatch, count: int):
        ids = torch.tensor(mb.input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(mb.positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata.build(device=self.device, **mb.meta_args)
        layers = self.model.model.layers
        ffn = _RemoteFFN(self, index, count, mb.num_tokens)
        return self.model.model.forward_steps(ids, pos, self.kv_caches, LocalAttend(layers, meta), ffn=ffn)

    def _wait_sends(self) -> None:
        for work, buf, peer in self._sends:
            self.wait(work, peer, "send", buf)
        self._sends = []


class _RemoteFFN:
    """One micro-batch's FFN hook: the normed hidden states go to every FFN rank; the layer's
    output is the sum of their partial outputs (ranks in order, so every run sums alike)."""

    def __init__(self, side: AttentionSide, index: int, count: int, num_tokens: int) -> None:
        self.side = side
        self.index = index
        self.count = count
        self.num_tokens = num_tokens

    def __call__(self, layer: int, h: torch.Tensor) -> Pending:
        side = self.side
        tag = exchange_tag(layer, self.index, self.count)
        msg = h.to(side.transport).contiguous()
        ranks = side.topology.ffn_rank_ids
        for r in ranks:
            side._sends.append((comm.send_tensor(msg, r, tag), msg, r))

        def finish() -> torch.Tensor:
            # Posted only now, after the other micro-batches' sends: the mirrored order.
            total = None
            for r in ranks:
                buf = torch.empty(self.num_tokens, h.shape[1], dtype=h.dtype, device=side.transport)
                side.clock.measure("wait", lambda: side.wait(comm.recv_tensor(buf, r, tag + 1), r, "FFN output", buf))  # noqa: B023
                buf = buf.to(side.device)
                total = buf if total is None else total + buf
            return total

        return Pending(finish=finish)


# The FFN side --------------------------------------------------------------------------------
class FFNWorker:
    """An FFN rank: every layer's FFN slice, applied to the hidden states of all attention ranks."""

    def __init__(self, init: AFDInit, rank: int, device: str) -> None:
        cfg = init.config
        self.config = cfg
        self.rank = rank
        self.topology = afd_topology(cfg)
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.transport = comm.transport_device(device)
        layers = ffn_layers(cfg.model, self.topology.ffn_ranks, self.dtype, "meta")
        layers.to_empty(device=device)
        receive_weights(layers, self.transport)
        if self.device.type == "cuda":
            from fapool.layers.fused import fuse_model

            fuse_model(layers)
        pack_for_device(layers, self.device)
        self.layers = layers

    def run(self) -> None:
        idle_since = time.perf_counter()
        while True:
            msg = comm.recv_object(0, None, tag=Tag.STEP, device=self.transport)
            if msg == SHUTDOWN:
                return
            stats = RankReport(self.rank, idle_s=time.perf_counter() - idle_since, role="FFN")
            if msg.hang_s:
                time.sleep(msg.hang_s)
            self.step(msg, stats)
            comm.send_object(stats, 0, None, tag=Tag.REPORT, device=self.transport)
            idle_since = time.perf_counter()

    @torch.inference_mode()
    def step(self, step: AFDStep, stats: RankReport) -> None:
        t_start = time.perf_counter()
        clock = StepClock(self.device, stream_ordered=self.transport != "cpu")
        hidden = self.config.model.hidden_size
        count = len(step.tokens)
        num_layers = len(self.layers)
        posted: dict[tuple[int, int], list[tuple[int, object, torch.Tensor]]] = {}
        sends: list[tuple[object, torch.Tensor, int]] = []

        def post(layer: int, i: int) -> None:
            tag = exchange_tag(layer, i, count)
            bufs = []
            for a, n in enumerate(step.tokens[i]):
                if n:
                    buf = torch.empty(n, hidden, dtype=self.dtype, device=self.transport)
                    bufs.append((a, comm.recv_tensor(buf, a, tag), buf))
            posted[layer, i] = bufs

        for i in range(count):
            post(0, i)
        for layer in range(num_layers):
            for i in range(count):
                bufs = posted.pop((layer, i))
                if not bufs:
                    continue
                for a, work, buf in bufs:
                    clock.measure("wait", lambda: blocking_wait(work, a, "hidden states", buf))  # noqa: B023
                    stats.num_tokens += buf.shape[0] if layer == 0 else 0
                x = torch.cat([buf for _, _, buf in bufs]).to(self.device)
                y = self.layers[layer](x)
                tag = exchange_tag(layer, i, count) + 1
                for (a, _, _), part in zip(bufs, y.to(self.transport).split([b.shape[0] for _, _, b in bufs])):
                    part = part.contiguous()
                    sends.append((comm.send_tensor(part, a, tag), part, a))
                if layer + 1 < num_layers:
                    post(layer + 1, i)
        for work, buf, a in sends:
            clock.measure("comm", lambda: blocking_wait(work, a, "send", buf))  # noqa: B023
        seconds = clock.finish()
        wall = time.perf_counter() - t_start
        stats.comm_s += seconds.get("comm", 0.0)
        stats.idle_s += seconds.get("wait", 0.0)
        stats.compute_s += max(0.0, wall - seconds.get("comm", 0.0) - seconds.get("wait", 0.0))


class AttentionRankWorker:
    """An attention rank other than the driver: builds its share of the model, then follows
    the driver's steps."""

    def __init__(self, init: AFDInit, rank: int, device: str) -> None:
        cfg = init.config
        self.rank = rank
        backend = make_backend(cfg.attention_backend, device)
        model = build_model(cfg.model, backend, DTYPES[cfg.dtype], "meta")
        drop_mlps(model)
        model.to_empty(device=device)
        if cfg.model.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        transport = comm.transport_device(device)
        receive_weights(model, transport)
        if torch.device(device).type == "cuda":
            from fapool.layers.fused import fuse_model

            fuse_model(model)
        pack_for_device(model, torch.device(device))
        self.side = AttentionSide(cfg, model.eval(), afd_topology(cfg), rank, device, blocking_wait)
        self.side.allocate_kv_cache(init.num_blocks)

    def run(self) -> None:
        idle_since = time.perf_counter()
        while True:
            msg = comm.recv_object(0, None, tag=Tag.STEP, device=self.side.transport)
            if msg == SHUTDOWN:
                return
            stats = RankReport(self.rank, idle_s=time.perf_counter() - idle_since, role="attention")
            if msg.hang_s:
                time.sleep(msg.hang_s)
            self.side.run(msg, stats)
            comm.send_object(stats, 0, None, tag=Tag.REPORT, device=self.side.transport)
            idle_since = time.perf_counter()


def afd_rank_main(init: AFDInit, rank: int, device: str) -> None:
    """A spawned AFD rank's role, from its init message."""
    try:
        worker = FFNWorker(init, rank, device) if init.role == "ffn" else AttentionRankWorker(init, rank, device)
        worker.run()
    except (comm.WorkerFailure, RuntimeError) as e:
        logger.warning("AFD rank %d stopping: %s", rank, e)
