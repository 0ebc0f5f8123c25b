"""An attention worker: holds KV blocks for the pool and answers "attend these queries over
these blocks" with (out, lse). It has no weights; it follows the driver's step plans.

Per step, for every layer and micro-batch that has work here, in (layer, micro-batch)
order — the order the dense worker sends in — it receives one packed tensor
[q rows | new k rows | new v rows], writes the K/V, attends, and sends back
[out rows (float32) | lse rows]. At the end of the step it reports its timings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from fapool.attention.selector import make_backend
from fapool.config import EngineConfig
from fapool.worker import comm

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def message_tag(layer: int, micro_batch: int, num_micro_batches: int) -> int:
    """Distinct tags per (layer, micro-batch) keep messages from crossing; 1000+ leaves room
    for control messages on low tags."""
    return 1000 + 2 * (layer * num_micro_batches + micro_batch)


@dataclass
class WorkerInit:
    config: EngineConfig
    worker_id: int
    num_blocks: int
    kv_heads: list[int]  # global KV head ids this worker stores (all of them unless head mode)


@dataclass
class WorkerStep:
    step: int
    copies: list[tuple[int, int]] = field(default_factory=list)
    batches: dict[int, object] = field(default_factory=dict)  # micro-batch -> WorkerBatch
    num_micro_batches: int = 1
    hang_s: float = 0.0  # fault injection for tests: stall this long before the step


@dataclass
class WorkerStepStats:
    worker_id: int
    attention_s: float = 0.0  # writing K/V and attending
    comm_s: float = 0.0  # posting sends, waiting for them
    idle_s: float = 0.0  # waiting for queries to arrive
    q_rows: int = 0


class AttentionWorker:
    def __init__(self, init: WorkerInit, rank: int, device: str) -> None:
        cfg = init.config
        m = cfg.model
        self.init = init
        self.rank = rank
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.backend = make_backend(cfg.attention_backend, device)
        self.group = m.num_attention_heads // m.num_key_value_heads
        self.num_heads = len(init.kv_heads) * self.group
        self.num_kv_heads = len(init.kv_heads)
        self.head_dim = m.head_dim
        self.scale = m.head_dim**-0.5
        self.num_layers = m.num_hidden_layers
        self.transport = comm.transport_device(device)
        shape = (init.num_blocks, cfg.cache.block_size, self.num_kv_heads, m.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.num_layers)
        ]

    def run(self) -> None:
        while True:
            msg = comm.recv_object(0, None, device=self.transport)
            if msg == "shutdown":
                return
            self.step(msg)

    @torch.inference_mode()
    def step(self, plan: WorkerStep) -> None:
        if plan.hang_s:
            time.sleep(plan.hang_s)
        stats = WorkerStepStats(self.init.worker_id)
        if plan.copies:
            src = torch.tensor([s for s, _ in plan.copies], device=self.device)
            dst = torch.tensor([d for _, d in plan.copies], device=self.device)
            for k, v in self.kv_caches:
                k[dst] = k[src]
                v[dst] = v[src]
        prepared = {mb: (batch, *batch.metadata(self.device)) for mb, batch in plan.batches.items()}
        pending_sends = []
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        for layer in range(self.num_layers):
            k_cache, v_cache = self.kv_caches[layer]
            for mb in sorted(prepared):
                batch, meta, kv_slots = prepared[mb]
                nq, nkv = batch.num_q_rows, len(batch.kv_slots)
                if nq == 0 and nkv == 0:
                    continue
                tag = message_tag(layer, mb, plan.num_micro_batches)
                buf = torch.empty(nq * H * D + 2 * nkv * Hkv * D, dtype=self.dtype, device=self.transport)
                t0 = time.perf_counter()
                comm.wait(comm.recv_tensor(buf, 0, tag), 0, "recv")
                t1 = time.perf_counter()
                q, k, v = buf.to(self.device).split([nq * H * D, nkv * Hkv * D, nkv * Hkv * D])
                if nkv:
                    self.backend.write_kv(k_cache, v_cache, k.view(nkv, Hkv, D), v.view(nkv, Hkv, D), kv_slots)
                if nq:
                    out, lse = self.backend.forward(q.view(nq, H, D), k_cache, v_cache, meta, self.scale)
                    reply = torch.cat([out.float().reshape(-1), lse.reshape(-1)]).to(self.transport)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t2 = time.perf_counter()
                    pending_sends.append((comm.send_tensor(reply, 0, tag + 1), reply))
                    stats.comm_s += time.perf_counter() - t2
                    stats.q_rows += nq
                else:
                    t2 = time.perf_counter()
                stats.idle_s += t1 - t0
                stats.attention_s += t2 - t1
        t3 = time.perf_counter()
        for work, _ in pending_sends:
            comm.wait(work, 0, "send")
        stats.comm_s += time.perf_counter() - t3
        comm.send_object(stats, 0, None, tag=2, device=self.transport)


def worker_main(rank: int, world_size: int, init_method: str, backend: str, device: str, timeout_s: float) -> None:
    """Entry point of a spawned (or torchrun-started) non-driver rank."""
    torch.set_num_threads(1)
    if backend == "nccl":
        comm.disable_nvlink_multicast()  # spawned ranks inherit it; torchrun-started ones set it here
    if torch.device(device).index is not None:
        # NCCL's bookkeeping and CUDA events use the current device: make it this rank's own.
        torch.cuda.set_device(torch.device(device))
    comm.init_process_group(rank, world_size, init_method, backend, timeout_s)
    try:
        init = comm.recv_object(0, None, tag=4, device=comm.transport_device(device))
        if isinstance(init, WorkerInit):
            par = init.config.parallel
            if par.tensor_parallel_size > 1:
                # Next to tensor-parallel dense ranks: torch.distributed wants every rank to
                # create every group, members or not.
                from fapool.worker.dense_worker import GROUP_TIMEOUT_S, tp_groups

                topology = comm.Topology(par.tensor_parallel_size, 1, init.config.pool.attention_workers)
                tp_groups(topology, GROUP_TIMEOUT_S)
            AttentionWorker(init, rank, device).run()
        else:  # a dense rank of the tensor/pipeline-parallel baseline
            from fapool.worker.dense_worker import dense_worker_main

            dense_worker_main(init, rank, device)
    except comm.WorkerFailure as e:
        # The driver went away: nothing left to serve.
        logger.warning("attention worker rank %d stopping: %s", rank, e)
    finally:
        try:
            import torch.distributed as dist

            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
