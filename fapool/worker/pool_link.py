"""A dense rank's link to the attention pool, and the attend hook that uses it.

Every dense rank whose layers attend pooled KV holds a PoolLink: the driver always (it also
sends the attention ranks their step plans and collects their reports), and with pipeline
parallelism each stage's rank for its own layers. Per layer and micro-batch the hook cuts each
attention rank's query rows and new K/V rows (its KV heads) out of q/k/v, posts them, attends
the local share meanwhile, and merges the answers (out, lse) exactly when the forward resumes.
An attention rank that dies or goes silent is marked failed and left out: its requests are
recomputed by the engine, the others do not depend on it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from fapool.attention.backend import empty_partial, merge_tree
from fapool.config import EngineConfig
from fapool.core.head_placement import HEAD_POLICIES
from fapool.models.llama import Pending
from fapool.sparse.placement import head_weights
from fapool.sparse.profile import SparseProfile
from fapool.worker import comm
from fapool.worker.pool_sparse import PoolSparse, SparseBatch, attend_pages
from fapool.worker.protocol import AttentionStep, RankReport, Tag, exchange_tag, pack_bytes
from fapool.worker.step_clock import StepClock
from fapool.worker.step_plan import MicroBatchPlan, Route

logger = logging.getLogger(__name__)


def pool_kv_heads(config: EngineConfig) -> dict[int, list[int]]:
    """Worker id -> the global KV heads it stores: all of them, or in head mode its share by
    the head-placement policy. With a sparse-attention profile, heads weigh what their budgets
    cost (seed 003's sparsity-aware placement), at the longest context the engine serves."""
    m, pool = config.model, config.pool
    workers = list(range(1, pool.attention_workers + 1))
    if pool.pool_mode != "head":
        return {w: list(range(m.num_key_value_heads)) for w in workers}
    weights = None
    if config.sparse_attention:
        longest = config.scheduler.max_model_len or m.max_position_embeddings
        weights = head_weights(SparseProfile.load(config.sparse_attention).fractions_at(longest))
    return HEAD_POLICIES[pool.head_placement](m.num_key_value_heads, workers, weights)


class PoolLink:
    def __init__(
        self,
        config: EngineConfig,
        topology: comm.Topology,
        kv_heads: dict[int, list[int]],
        device: torch.device,
        transport: str,
        waiter: comm.Waiter,
        backend,
    ) -> None:
        self.topology = topology
        self.backend = backend  # attends the local share (the driver's: the engine's backend)
        self.kv_heads = kv_heads
        self.num_kv_heads = config.model.num_key_value_heads
        self.device = device
        self.transport = transport
        self.waiter = waiter
        self.timeout_s = config.pool.worker_timeout_s
        group = config.model.num_queries_per_kv
        self.head_idx = {
            w: (
                torch.tensor(hs, device=device),
                torch.tensor([h * group + g for h in hs for g in range(group)], device=device),
            )
            for w, hs in kv_heads.items()
        }
        # Where each worker is reached: its rank in the default group, or (an elastic pool's
        # worker) a Peer of its own pair group, set when it joins.
        self.peers: dict[int, int | comm.Peer] = {w: topology.attention_rank(w) for w in kv_heads}
        # A later stage's leader beside an elastic pool: pair groups still being made with
        # joining workers (ray_pool.StagePairs), each a Future of its Peer.
        self.joins: dict[int, Future] = {}
        self.failed: dict[int, str] = {}
        self._new_failures: list[int] = []
        self.clock = StepClock(device)
        self.sends: list = []  # (request, buffer kept alive, worker) of the step's sends
        self.local_attention_s = 0.0
        # Sparse decode (the driver's link, with a sparse-attention profile): the summaries and
        # selection, and the step's plan per micro-batch.
        self.sparse: PoolSparse | None = None
        self.step_sparse: list[SparseBatch] = []

    # Failures -----------------------------------------------------------------------------
    def live(self, worker: int) -> bool:
        return worker not in self.failed

    def fail(self, worker: int, why: str) -> None:
        if worker not in self.failed:
            logger.error("attention worker %d (%s) failed: %s", worker, self.peers[worker], why)
            self.failed[worker] = why
            self._new_failures.append(worker)

    def take_failures(self) -> list[tuple[int, str]]:
        new, self._new_failures = self._new_failures, []
        return [(w, self.failed[w]) for w in new]

    def known_failed(self, workers: list[int]) -> None:
        """Workers another rank (the driver) gave up on: no more traffic to them from here."""
        for w in workers:
            self.failed.setdefault(w, "failed (seen by the driver)")

    # A step -------------------------------------------------------------------------------
    def begin_step(self, clock: StepClock, workers: Iterable[int] = ()) -> StepClock:
        """Start a step whose plan routes work to `workers`; waits on attention ranks are
        booked as "wait" on the rank's `clock`. A worker whose pair group with this rank is
        still being made is waited for (a worker that never comes is failed)."""
        self.clock = clock
        self.sends = []
        self.local_attention_s = 0.0
        for w in set(workers) & self.joins.keys():
            try:
                self.peers[w] = self.joins.pop(w).result(timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - gloo's error or the timeout: the worker is lost
                self.fail(w, f"could not make a pair group with it: {e!r}")
        return self.clock

    def finish_sends(self) -> None:
        """Wait for the step's sends (a failed worker's are abandoned)."""
        for work, buf, w in self.sends:
            if not self.live(w):
                self.waiter.abandon(work, buf)
                continue
            try:
                self.waiter.wait(work, self.timeout_s, self.peers[w], "send", buf)
            except comm.WorkerFailure as e:
                self.fail(w, str(e))
        self.sends = []

    def attend_hook(
        self, routes: dict[int, Route], num_tokens: int, index: int, count: int, meta, layers
    ) -> PoolAttend:
        sparse = self.step_sparse[index] if self.step_sparse else None
        return PoolAttend(self, routes, num_tokens, index, count, meta, layers, sparse)

    # The driver's side: plans out, reports in ---------------------------------------------
    def send_plans(
        self,
        step: int,
        plans: list[MicroBatchPlan],
        pool_copies: list[tuple[int, int, int]],
        order: list[tuple[int, int, int]],
        hang: dict[int, float],
    ) -> list[int]:
        """Send each live attention rank its step plan; returns the workers told."""
        told = []
        for w in self.kv_heads:
            if not self.live(w):
                continue
            batches = {i: p.routes[w].batch for i, p in enumerate(plans) if w in p.routes}
            copies = [(s, d) for ww, s, d in pool_copies if ww == w]
            stall = hang.pop(w, 0.0)
            if not batches and not copies and not stall:
                continue
            mine = [(layer, mb, peer) for layer, mb, peer in order if mb in batches]
            msg = AttentionStep(step, copies, batches, len(plans), mine, stall)
            try:
                rank = self.peers[w]
                comm.send_object(msg, rank, self.waiter, self.timeout_s, tag=Tag.STEP, device=self.transport)
                told.append(w)
            except comm.WorkerFailure as e:
                self.fail(w, str(e))
        return told

    def collect_reports(self, told: list[int]) -> dict[int, RankReport]:
        reports = {}
        for w in told:
            if not self.live(w):
                continue
            try:
                rank = self.peers[w]
                reports[w] = comm.recv_object(rank, self.waiter, self.timeout_s, tag=Tag.REPORT, device=self.transport)
            except comm.WorkerFailure as e:
                self.fail(w, str(e))
        return reports


class PoolAttend:
    """The attend hook for one micro-batch: remote shares out first, local share meanwhile,
    merge when the generator resumes. With sparse decode the driver first chooses the decode
    rows' blocks (pool_sparse), and every holder attends only the chosen ones it stores."""

    def __init__(
        self,
        link: PoolLink,
        routes: dict[int, Route],
        num_tokens: int,
        index: int,
        count: int,
        meta,
        layers,
        sparse: SparseBatch | None = None,
    ):
        self.link = link
        self.index = index
        self.count = count
        self.meta = meta
        self.layers = layers
        self.sparse = sparse
        self.cuts = {w: _Cut.of(rt, num_tokens, link, w) for w, rt in routes.items()}
        self.dense_meta = meta
        # No KV of this micro-batch here (Lamina: every block pooled): nothing to store, attend
        # or merge locally. The local share's new K/V would count in its kv_lens.
        self.no_local = sparse is None and not any(meta.kv_lens_cpu)
        self.all_decode = False
        if sparse is not None and sparse.decode is not None:  # decode rows see no KV densely
            decode = set(sparse.decode.token_list)
            self.all_decode = len(decode) == num_tokens
            starts = itertools.accumulate(meta.query_lens_cpu, initial=0)
            self.dense_meta = meta.without_kv([s for s, start in zip(range(meta.num_seqs), starts) if start in decode])

    def __call__(self, layer: int, q, k, v, kv_cache) -> Pending:
        chosen = None
        if self.sparse is not None:
            chosen = self.link.sparse.select(layer, q, k, self.sparse)
        recvs = self.post_remote(layer, q, k, v, chosen)
        if self.no_local:
            out, lse = None, None
        else:
            out, lse = self.attend_local(layer, q, k, v, kv_cache, chosen)
        # Always hand control back, even with nothing remote: micro-batches then advance in
        # lockstep, layer by layer, so K/V an earlier micro-batch writes into a block that a
        # later one shares through the prefix cache is in place before that one reads it.
        return Pending(finish=lambda: self._merge(q, out, lse, recvs) if recvs else self._local_only(q, out))

    def post_remote(self, layer: int, q, k, v, chosen: torch.Tensor | None = None) -> list:
        """Send each live worker its query rows and new K/V rows (of its heads), with sparse
        decode the pages chosen there; post the receives of its (out, lse). q/k/v hold every
        head here."""
        link = self.link
        tag = exchange_tag(layer, self.index, self.count)
        recvs = []
        for w, cut in self.cuts.items():
            if not link.live(w) or (cut.nq == 0 and cut.nkv == 0):
                continue
            parts = [cut.take(q, cut.q_rows, cut.q_heads)]
            if cut.nkv:
                parts += [cut.take(k, cut.kv_rows, cut.kv_heads), cut.take(v, cut.kv_rows, cut.kv_heads)]
            if chosen is not None and w in self.sparse.decode.remote:
                pages, lens = link.sparse.pages(chosen, self.sparse.decode, self.sparse.decode.remote[w])
                parts.append(torch.cat([pages, lens[..., None]], dim=-1))
            msg = pack_bytes(parts).to(link.transport)
            rank = link.peers[w]
            try:
                link.sends.append((comm.send_tensor(msg, rank, tag), msg, w))
                if cut.nq:
                    buf = torch.empty(cut.nq * cut.hq * (q.shape[-1] + 1), dtype=torch.float32, device=link.transport)
                    recvs.append((w, cut, comm.recv_tensor(buf, rank, tag + 1), buf))
            except RuntimeError as e:
                link.fail(w, str(e))
        return recvs

    def attend_local(
        self, layer: int, q, k, v, kv_cache, chosen: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's local K/V and attend over the local blocks (this rank's heads);
        with sparse decode, the decode rows over the chosen local blocks."""
        t0 = time.perf_counter()
        backend = self.link.backend
        k_cache, v_cache = kv_cache
        scale = self.layers[layer].self_attn.scale
        backend.write_kv(k_cache, v_cache, k, v, self.meta.slot_mapping)
        if chosen is None:
            out, lse = backend.forward(q, k_cache, v_cache, self.meta, scale)
        else:
            if self.all_decode:
                out, lse = empty_partial(q)
            else:
                out, lse = backend.forward(q, k_cache, v_cache, self.dense_meta, scale)
            d = self.sparse.decode
            pages, lens = self.link.sparse.pages(chosen, d, d.local)
            o, l = attend_pages(backend, q.index_select(0, d.tokens), k_cache, v_cache, pages, lens, scale)
            out[d.tokens] = o.to(out.dtype)
            lse[d.tokens] = l
        self.link.local_attention_s += time.perf_counter() - t0
        return out, lse

    def _merge(self, q, out, lse, recvs) -> torch.Tensor:
        outs, lses = self.remote_partials(q.shape, recvs)
        if out is not None:
            outs, lses = [out.float()] + outs, [lse] + lses
        if not outs:  # every worker of this micro-batch failed: the engine recomputes its requests
            return torch.zeros_like(q)
        merged, _ = merge_tree(outs, lses)
        return merged.to(q.dtype)

    @staticmethod
    def _local_only(q, out) -> torch.Tensor:
        return torch.zeros_like(q) if out is None else out

    def remote_partials(self, shape, recvs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Wait for the workers' answers; each (worker, round) becomes one full-shape partial
        [T, H, D] / [T, H] with lse -inf where that worker saw nothing."""
        link = self.link
        dev = link.device
        T, H, D = shape
        outs, lses = [], []
        for w, cut, work, buf in recvs:
            rank = link.peers[w]
            try:
                link.clock.measure("wait", lambda: link.waiter.wait(work, link.timeout_s, rank, "attention", buf))  # noqa: B023
            except comm.WorkerFailure as e:
                link.fail(w, str(e))
                continue
            buf = buf.to(dev)
            o = buf[: cut.nq * cut.hq * D].view(cut.nq, cut.hq, D)
            l = buf[cut.nq * cut.hq * D :].view(cut.nq, cut.hq)
            if cut.rounds is None:  # every row and head, once: the answer is the partial
                outs.append(o)
                lses.append(l)
                continue
            heads = torch.arange(H, device=dev) if cut.q_heads is None else cut.q_heads
            for idx in cut.rounds:
                tokens = idx if cut.q_rows is None else cut.q_rows[idx]
                full_o = torch.zeros(T, H, D, dtype=torch.float32, device=dev)
                full_l = torch.full((T, H), float("-inf"), dtype=torch.float32, device=dev)
                full_o.index_put_((tokens[:, None], heads[None, :]), o[idx])
                full_l.index_put_((tokens[:, None], heads[None, :]), l[idx])
                outs.append(full_o)
                lses.append(full_l)
        return outs, lses


@dataclass
class _Cut:
    """How one worker's share of a micro-batch is cut out of q/k/v and put back, computed once
    per step: index tensors, or None where the share is every row or every head (no copy)."""

    nq: int
    nkv: int
    hq: int  # query heads the worker attends
    q_rows: torch.Tensor | None
    kv_rows: torch.Tensor | None
    q_heads: torch.Tensor | None
    kv_heads: torch.Tensor | None
    rounds: list[torch.Tensor] | None  # answer rows per round; None: one round, rows = all tokens

    @classmethod
    def of(cls, route: Route, num_tokens: int, link: PoolLink, worker: int) -> _Cut:
        dev = link.device
        everything = list(range(num_tokens))

        def rows(ids: list[int]) -> torch.Tensor | None:
            return None if ids == everything else torch.tensor(ids, dtype=torch.long, device=dev)

        kv_idx, q_idx = link.head_idx[worker]
        all_heads = len(kv_idx) == link.num_kv_heads
        q_rows = rows(route.q_rows)
        whole = q_rows is None and all_heads and len(route.rounds) == 1
        return cls(
            len(route.q_rows),
            len(route.kv_rows),
            len(q_idx),
            q_rows,
            rows(route.kv_rows),
            None if all_heads else q_idx,
            None if all_heads else kv_idx,
            None if whole else [torch.tensor(r, dtype=torch.long, device=dev) for r in route.rounds],
        )

    @staticmethod
    def take(x: torch.Tensor, rows: torch.Tensor | None, heads: torch.Tensor | None) -> torch.Tensor:
        if rows is not None:
            x = x.index_select(0, rows)
        if heads is not None:
            x = x.index_select(1, heads)
        return x.reshape(-1)
