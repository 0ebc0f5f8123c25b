"""An attention worker: holds KV blocks for the pool and answers "attend these queries over
these blocks" with (out, lse). It has no weights; it follows the driver's step plans.

Per step, for every (layer, micro-batch) that has work here, in the plan's order (the order
the dense ranks send in), it receives one packed message [q rows | new k rows | new v rows |
sparse decode: chosen pages and lens per entry and KV head] from the dense rank that runs that
layer, writes the K/V, attends, and sends that rank back [out rows (float32) | lse rows]. At
the end of the step it reports to the driver.
"""

from __future__ import annotations

import logging
import time

import torch

from fapool.attention.backend import empty_partial
from fapool.attention.selector import make_backend
from fapool.worker import comm
from fapool.worker.kv_tensors import allocate_kv, copy_kv_blocks
from fapool.worker.model_runner import DTYPES
from fapool.worker.pool_sparse import attend_pages
from fapool.worker.protocol import (
    SHUTDOWN,
    AttentionInit,
    AttentionStep,
    RankReport,
    Tag,
    exchange_tag,
    unpack_bytes,
)

logger = logging.getLogger(__name__)


class AttentionWorker:
    def __init__(self, init: AttentionInit, rank: int, device: str, peers: dict[int, comm.Peer] | None = None) -> None:
        """`peers`: dense ranks reached through pair groups (an elastic pool's worker); the
        others through the default group."""
        cfg = init.config
        self.peers = peers or {}
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
        self.kv_caches = allocate_kv(self.num_layers, shape, self.dtype, self.device)

    def run(self) -> None:
        while True:
            msg = comm.recv_object(self.peer(0), None, tag=Tag.STEP, device=self.transport)
            if msg == SHUTDOWN:
                return
            self.step(msg)

    def peer(self, rank: int) -> int | comm.Peer:
        return self.peers.get(rank, rank)

    @torch.inference_mode()
    def step(self, plan: AttentionStep) -> None:
        if plan.hang_s:
            time.sleep(plan.hang_s)
        stats = RankReport(self.rank)
        copy_kv_blocks(self.kv_caches, plan.copies, self.device)
        prepared = {mb: (batch, *batch.metadata(self.device)) for mb, batch in plan.batches.items()}
        pending_sends = []
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        for layer, mb, dense_rank in plan.order:
            peer = self.peer(dense_rank)
            k_cache, v_cache = self.kv_caches[layer]
            batch, meta, kv_slots, sparse_rows = prepared[mb]
            nq, nkv = batch.num_q_rows, len(batch.kv_slots)
            if nq == 0 and nkv == 0:
                continue
            tag = exchange_tag(layer, mb, plan.num_micro_batches)
            ns, width = len(batch.sparse_entries), batch.sparse_pages
            specs = [(self.dtype, nq * H * D), (self.dtype, nkv * Hkv * D), (self.dtype, nkv * Hkv * D)]
            specs.append((torch.int32, ns * Hkv * (width + 1)))
            buf = torch.empty(sum(n * dt.itemsize for dt, n in specs), dtype=torch.uint8, device=self.transport)
            t0 = time.perf_counter()
            comm.wait(comm.recv_tensor(buf, peer, tag), peer, "recv")
            t1 = time.perf_counter()
            q, k, v, chosen = unpack_bytes(buf.to(self.device), specs)
            if nkv:
                self.backend.write_kv(k_cache, v_cache, k.view(nkv, Hkv, D), v.view(nkv, Hkv, D), kv_slots)
            if nq:
                q = q.view(nq, H, D)
                if ns == nq:  # every row decodes sparsely
                    out, lse = empty_partial(q)
                else:
                    out, lse = self.backend.forward(q, k_cache, v_cache, meta, self.scale)
                if ns:
                    chosen = chosen.view(ns, Hkv, width + 1)
                    o, l = attend_pages(
                        self.backend, q.index_select(0, sparse_rows), k_cache, v_cache,
                        chosen[..., :width].contiguous(), chosen[..., width].contiguous(), self.scale,
                    )
                    out[sparse_rows] = o.to(out.dtype)
                    lse[sparse_rows] = l
                reply = torch.cat([out.float().reshape(-1), lse.reshape(-1)]).to(self.transport)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                pending_sends.append((comm.send_tensor(reply, peer, tag + 1), reply, peer))
                stats.comm_s += time.perf_counter() - t2
                stats.q_rows += nq
                stats.sparse_rows += ns
            else:
                t2 = time.perf_counter()
            stats.idle_s += t1 - t0
            stats.compute_s += t2 - t1
        t3 = time.perf_counter()
        for work, _, peer in pending_sends:
            comm.wait(work, peer, "send")
        stats.comm_s += time.perf_counter() - t3
        comm.send_object(stats, self.peer(0), None, tag=Tag.REPORT, device=self.transport)

