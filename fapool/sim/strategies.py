"""Deployment strategies: how one instance's GPUs split a step's work and what a step costs: StaticTPPP,
FAPool (seed 000, the engine's pool modes), head_parallel (Lamina, seed 004) and AFD (seed 002).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fapool.sim.cost_model import CostModel, kv_capacity_tokens
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import contention_stretch
from fapool.sim.ledger import GroupLedger, PoolLedger


@dataclass
class StepBatch:
    ctx: np.ndarray  # tokens already in KV, per slot
    new: np.ndarray  # tokens this step adds (1 decode, chunk for prefill, 0 idle)
    group: np.ndarray  # attention group per slot

    @property
    def active(self) -> np.ndarray:
        return self.new > 0


@dataclass
class StepCost:
    duration: float
    busy: np.ndarray  # compute seconds per GPU of the instance
    comm: np.ndarray  # communication seconds per GPU


def _attn_terms(b: StepBatch, cap: float | None = None):
    """(kv_read, qk_pairs, queries) summed over slots; `cap` limits each slot's context (FA Pool's base)."""
    end, mid = b.ctx + b.new, b.ctx + (b.new + 1) / 2.0
    if cap is not None:
        end, mid = np.minimum(end, cap), np.minimum(mid, cap)
    return float(end[b.active].sum()), float((b.new * mid).sum()), float(b.new.sum())


class Strategy:
    """One instance's topology; `engine_args` are the EngineArgs that run it (`fapool plan --json`)."""

    name = "strategy"
    replicas = 1
    max_batch = 1

    def validate(self, cost: CostModel) -> None: ...
    def num_gpus(self) -> int: ...
    def gpu_labels(self) -> list[str]: ...
    def make_ledger(self, cost: CostModel, num_slots: int, group_of_slot: np.ndarray): ...
    def step_cost(self, cost: CostModel, b: StepBatch, ledger) -> StepCost: ...
    def describe(self) -> str: ...
    def engine_args(self) -> dict: ...

    def num_groups(self) -> int:
        return 1

    def slots_per_group(self) -> int:
        return self.max_batch

    def total_gpus(self) -> int:
        return self.num_gpus() * self.replicas

    def same_node(self, cost: CostModel) -> bool:
        """Whether the instance fits one node (NVLink between its GPUs, else the NIC)."""
        return self.num_gpus() <= cost.hw.gpus_per_node

    def _tail(self, overlap: bool | None = None) -> str:
        """The end of `describe`: overlap, replicas and GPU count."""
        ov = "" if overlap is None else ", overlap" if overlap else ", no overlap"
        rep = f" x{self.replicas}" if self.replicas > 1 else ""
        return f"{ov}{rep} ({self.total_gpus()} GPUs)"


@dataclass
class StaticTPPP(Strategy):
    tp: int = 8
    pp: int = 1
    replicas: int = 1
    max_batch: int = 256
    kv_share: float = 1.0  # sparse decode: the share of each KV head's blocks read (1: dense)
    name: str = "static"

    def validate(self, cost: CostModel) -> None:
        m = cost.model
        if self.tp < 1 or self.pp < 1 or self.replicas < 1 or self.max_batch < 1 or not 0 < self.kv_share <= 1:
            raise SimInputError("static strategy needs tp, pp, replicas, max_batch >= 1 and 0 < kv_share <= 1")
        if self.pp > m.num_hidden_layers:
            raise SimInputError(f"pp={self.pp} exceeds the model's {m.num_hidden_layers} layers")
        if self.tp > m.num_attention_heads:
            raise SimInputError(f"tp={self.tp} exceeds the model's {m.num_attention_heads} heads")
        if self.kv_capacity(cost) < 1:
            raise SimInputError(f"{self.describe()}: the weights leave no room for KV on {cost.hw.name}")

    def num_gpus(self) -> int:
        return self.tp * self.pp

    def gpu_labels(self) -> list[str]:
        return [f"s{s}r{r}" for s in range(self.pp) for r in range(self.tp)]

    def kv_capacity(self, cost: CostModel) -> int:
        """KV tokens one GPU holds beside its share of the weights (its layers, its KV heads)."""
        m = cost.model
        per_gpu_weights = cost.weight_bytes("all") / (self.tp * self.pp)
        kv_heads_frac = math.ceil(m.num_key_value_heads / self.tp) / m.num_key_value_heads
        per_token = cost.kv_bytes_per_token() / self.pp * kv_heads_frac
        return kv_capacity_tokens(cost.hw.kv_budget_bytes - per_gpu_weights, per_token)

    def make_ledger(self, cost, num_slots, group_of_slot):
        return GroupLedger(self.kv_capacity(cost), 1, group_of_slot)

    def timing(self, cost: CostModel, n_seqs: float, tokens: float, kv: float, pairs: float):
        """(period, per-GPU compute, per-GPU comm, lm head) of one step: as the engine runs it, the
        step's pp micro-batches fill the stages and drain within the step, the last stage running
        the LM head for each."""
        m = cost.model
        n_mb = max(1, min(self.pp, math.ceil(n_seqs)))
        lps = math.ceil(m.num_hidden_layers / self.pp)
        gpn = cost.hw.gpus_per_node
        pp_same = all((s * self.tp) // gpn == ((s + 1) * self.tp) // gpn for s in range(self.pp - 1))
        t_mb = tokens / n_mb
        dense_c, dense_ar = cost.dense_layer(t_mb, self.tp, self.tp <= gpn)
        if self.kv_share < 1 and tokens <= n_seqs:  # a decode step, sparse
            attn = cost.sparse_attention(kv / n_seqs, n_seqs / n_mb, self.kv_share, head_fraction=1.0 / self.tp)
        else:
            attn = float(cost.attention(kv / n_mb, pairs / n_mb, t_mb, 1.0 / self.tp))
        # CPU ranks: a stage's tp ranks compute at once, and in the pipeline's middle those of every
        # stage; the first stage time (fill) and the last (drain) run alone.
        segs = n_mb + self.pp - 1
        alone = min(segs, 2)
        stage = lps * (dense_c + attn)
        both = cost.concurrency(self.tp * n_mb)
        compute = stage * (alone * cost.concurrency(self.tp) + (segs - alone) * both)
        boundary = float(cost.p2p(cost.hidden_bytes(t_mb), pp_same)) + cost.exchange()
        stage_comm = lps * dense_ar + (boundary if self.pp > 1 else 0.0)
        lm = float(cost.lm_head(n_seqs / n_mb, self.tp))
        # The engine replays CUDA graphs only for single-device, decode-only steps.
        graphs = self.tp * self.pp == 1 and tokens <= n_seqs
        chain = compute + segs * stage_comm + n_mb * lm + cost.rank_step(self.num_gpus())
        if self.tp == 1 and self.pp > 1:  # calibrated at TP 1 only
            chain += cost.pp_extra(self.pp, m.num_hidden_layers)
        period = float(cost.finish_step(chain, n_seqs, kv, graphs, lps * n_mb))
        return period, n_mb * (stage * both), n_mb * stage_comm, n_mb * lm

    def step_cost(self, cost: CostModel, b: StepBatch, ledger) -> StepCost:
        kv, pairs, tokens = _attn_terms(b)
        period, compute, comm, lm = self.timing(cost, float(b.active.sum()), tokens, kv, pairs)
        busy = np.full(self.num_gpus(), compute)
        busy[-self.tp :] += lm  # last stage runs the LM head
        return StepCost(period, busy, np.full(self.num_gpus(), comm))

    def describe(self) -> str:
        return f"static TP{self.tp}xPP{self.pp}{self._tail()}"

    def engine_args(self) -> dict:
        return {"tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp}


@dataclass
class FAPool(Strategy):
    base_tp: int = 8
    pool_size: int = 24
    threshold: int = 4096
    tokens_per_worker: int = 4096
    mode: str = "shard"  # the engine's pool_mode: shard | replicate | head
    overlap: bool = True
    replicas: int = 1
    max_batch: int = 1024
    name: str = "fapool"

    def validate(self, cost: CostModel) -> None:
        m = cost.model
        if self.mode not in ("shard", "replicate", "head"):
            raise SimInputError(f"pool mode must be shard, replicate or head, got {self.mode!r}")
        if self.base_tp < 1 or self.pool_size < 0 or self.replicas < 1 or self.max_batch < 1:
            raise SimInputError("fapool needs base_tp >= 1, pool_size >= 0, replicas >= 1, max_batch >= 1")
        if self.threshold < 0 or self.tokens_per_worker < 1:
            raise SimInputError("fapool needs threshold >= 0 and tokens_per_worker >= 1")
        if self.mode == "head" and self.pool_size > m.num_key_value_heads:
            raise SimInputError(f"head mode over {self.pool_size} workers needs at least that many KV heads "
                                f"(model has {m.num_key_value_heads})")
        if self.threshold == 0 and self.pool_size == 0:
            raise SimInputError("threshold 0 needs a pool (pool_size >= 1)")
        if self.base_capacity(cost) < 1:
            raise SimInputError(f"{self.describe()}: the weights leave no room for KV on the base GPUs")

    def num_gpus(self) -> int:
        return self.base_tp + self.pool_size

    def gpu_labels(self) -> list[str]:
        return [f"base{i}" for i in range(self.base_tp)] + [f"pool{i}" for i in range(self.pool_size)]

    def base_capacity(self, cost: CostModel) -> int:
        return StaticTPPP(tp=self.base_tp).kv_capacity(cost)  # the base holds all weights, as TP base_tp

    def worker_capacity(self, cost: CostModel) -> int:
        return kv_capacity_tokens(cost.hw.kv_budget_bytes, cost.kv_bytes_per_token())

    def head_share(self, cost: CostModel) -> np.ndarray:
        """Fraction of KV heads each pool worker holds (head mode)."""
        h, P = cost.model.num_key_value_heads, self.pool_size
        return np.array([h // P + (1 if i < h % P else 0) for i in range(P)]) / h

    def make_ledger(self, cost, num_slots, group_of_slot, max_slot_tokens: int | None = None):
        share = self.head_share(cost) if self.mode == "head" else None
        return PoolLedger(num_slots, self.base_capacity(cost), self.worker_capacity(cost), self.pool_size,
                          self.threshold, self.tokens_per_worker, self.mode, share, max_slot_tokens)

    def micro_batches(self, b: StepBatch) -> list[np.ndarray]:
        """Slot indices of the step's micro-batches, cut as the engine cuts them (two with overlap)."""
        active = np.flatnonzero(b.active)
        n_mb = max(1, min(2 if self.overlap else 1, len(active)))
        return [g for g in np.array_split(active, n_mb) if len(g)]

    def pool_calls(self, b: StepBatch, ledger: PoolLedger) -> tuple[np.ndarray, np.ndarray, int, int, int]:
        """One layer's pool machinery: per worker the calls and their sequences, the (micro-batch,
        worker) routes, micro-batches with a route, micro-batches."""
        P = self.pool_size
        mbs = self.micro_batches(b)
        calls, seqs, pool_mbs = np.zeros(P), np.zeros(P), 0
        pool_tok = np.maximum(b.ctx + b.new - self.threshold, 0)
        for k, idx in enumerate(mbs):
            if self.mode == "head":
                n = float((pool_tok[idx] > 0).sum())
                on = np.full(P, n > 0)  # every worker holds some heads (validate: P <= KV heads)
                seqs += np.where(on, n, 0.0)
            else:
                held = ledger.attend(idx, k) > 0
                on = held.any(axis=0)
                seqs += held.sum(axis=0)
            calls += on
            pool_mbs += bool(on.any())
        return calls, seqs, int(calls.sum()), pool_mbs, len(mbs)

    def remote_layer(self, cost: CostModel, attn_w, q_bytes_w, ret_bytes_w, counts):
        """One layer's pool path (queries out, the slowest worker's attention, partials back), the LSE
        merge, the driver's extras a layer and a step, the workers' seconds and the transfers (base send,
        base receive, per worker receive and send) from each worker's roofline attention, bytes in and
        out, and pool_calls' counts; a worker's seconds add the calibrated PoolOverheads, the driver's
        RankOverheads.pool_extra_s (two micro-batches: pool_mb2_extra_s) and CPU core contention.
        Shared with the planner."""
        calls, seqs, routes, pool_mbs, n_mb = counts
        attn_w = np.asarray(attn_w, dtype=np.float64)
        overheads = cost.hw.pool
        driver_extra = step_extra = 0.0
        if overheads is not None:
            attn_w = attn_w + overheads.worker_calls(calls, seqs)
            driver_extra = overheads.driver_layer(n_mb, pool_mbs, routes)
            step_extra = overheads.driver_step_s
        if cost.hw.ranks is not None:  # the whole step's calibrated rest, a layer and a step
            rests = cost.hw.ranks.pool_mb2_extra_s if self.overlap else cost.hw.ranks.pool_extra_s
            a, s = {n: (a, s) for n, a, s in rests}.get(self.pool_size, (0.0, 0.0))
            if self.overlap:  # two micro-batches: on the step as fitted, their layers overlapping
                step_extra += cost.model.num_hidden_layers * a + s
            else:
                driver_extra, step_extra = driver_extra + a, step_extra + s
        # CPU: processes busy at once beyond the cores share them; with overlap the driver
        # computes beside the workers and loses (s - 1) x the busiest worker's time.
        busy_at_once = int((attn_w > 0).sum()) + (self.base_tp if self.overlap else 0)
        stretch = contention_stretch(busy_at_once, cost.hw.cpu_cores)
        if stretch > 1:
            if self.overlap:
                driver_extra += (stretch - 1) * float(attn_w.max())
            attn_w = attn_w * stretch
        tp, same = self.base_tp, self.same_node(cost)
        send_base = float(cost.p2p(np.sum(q_bytes_w) / tp, same))
        recv_base = float(cost.p2p(np.sum(ret_bytes_w) / tp, same))
        recv_w, send_w = np.asarray(cost.p2p(q_bytes_w, same)), np.asarray(cost.p2p(ret_bytes_w, same))
        pool_path = max(send_base, recv_w.max()) + attn_w.max() + max(recv_base, send_w.max())
        merge = float(cost.elementwise(3 * np.sum(ret_bytes_w) / tp))
        return pool_path, merge, driver_extra, step_extra, attn_w, (send_base, recv_base, recv_w, send_w)

    def step_cost(self, cost: CostModel, b: StepBatch, ledger: PoolLedger) -> StepCost:
        L, tp = cost.model.num_hidden_layers, self.base_tp
        n_seqs = int(b.active.sum())
        kv_loc, pairs_loc, tokens = _attn_terms(b, cap=self.threshold)
        local = float(cost.attention(kv_loc, pairs_loc, tokens, 1.0 / tp))
        pool_tok = np.maximum(b.ctx + b.new - self.threshold, 0)
        P = self.pool_size
        overheads = cost.hw.pool  # None: each worker's attention is one roofline call a layer
        attn_w = q_bytes_w = ret_bytes_w = np.zeros(P)
        if P and pool_tok.any():
            # Causal: only queries past the threshold see pool keys (all of a decode step's).
            pool_q = np.minimum(b.new, pool_tok)
            if self.mode == "head":
                share = self.head_share(cost)
                queries, pairs = float(pool_q.sum()), float((pool_q * pool_tok).sum())
                attn_w = np.array([float(cost.attention(pool_tok.sum(), pairs, queries, s)) for s in share])
                q_bytes_w = cost.query_bytes(queries, 1.0) * share
                ret_bytes_w = cost.partial_bytes(queries, 1.0) * share
                new_kv_w = ledger.placed * share  # whole-token units -> this worker's heads
            else:
                att = np.zeros_like(ledger.owned)  # [slots, workers]: the KV each worker reads
                for k, idx in enumerate(self.micro_batches(b)):
                    att[idx] = ledger.attend(idx, k)
                holds = att > 0
                queries_w = pool_q @ holds
                if overheads is None:
                    attn_w = np.asarray(cost.attention(att.sum(axis=0), pool_q @ att, queries_w))
                else:  # one call per micro-batch, each over its own sequences' KV
                    attn_w = sum(np.asarray(cost.attention(att[i].sum(axis=0), pool_q[i] @ att[i],
                                                           pool_q[i] @ holds[i]), dtype=np.float64)
                                 for i in self.micro_batches(b))
                q_bytes_w, ret_bytes_w = cost.query_bytes(queries_w), cost.partial_bytes(queries_w)
                new_kv_w = ledger.placed
            q_bytes_w = q_bytes_w + new_kv_w * cost.kv_bytes_per_token_layer()
        driver_extra = step_extra = send_base = recv_base = pool_path = merge = 0.0
        recv_w = send_w = np.zeros(P)
        if attn_w.any():
            counts = self.pool_calls(b, ledger) if overheads is not None else (None, None, 0, 0, 0)
            pool_path, merge, driver_extra, step_extra, attn_w, (send_base, recv_base, recv_w, send_w) = \
                self.remote_layer(cost, attn_w, q_bytes_w, ret_bytes_w, counts)
        elif overheads is not None and P:
            driver_extra = overheads.driver_layer(1, 0, 0)  # the engine's pool path, nothing remote
        kv = float((b.ctx + b.new)[b.active].sum())
        duration, dense_c, dense_ar = self.step_time(cost, tokens, n_seqs, local, pool_path, merge, kv,
                                                     driver_extra, step_extra)
        base = L * (dense_c + local + merge + driver_extra) + float(cost.lm_head(n_seqs, tp)) + step_extra
        busy = np.concatenate([np.full(tp, base), L * attn_w])
        comm = np.concatenate([np.full(tp, L * (dense_ar + send_base + recv_base)), L * (recv_w + send_w)])
        return StepCost(duration, busy, comm)

    def step_time(self, cost: CostModel, tokens: float, n_seqs: float, local: float, pool_path: float,
                  merge: float, kv_tokens: float = 0.0, driver_extra: float = 0.0, step_extra: float = 0.0):
        """(step seconds, base dense compute a layer, base all-reduce a layer) from one layer's local
        attention, pool path (send, attend, return) and merge. Shared with the planner."""
        L, tp = cost.model.num_hidden_layers, self.base_tp
        lm = float(cost.lm_head(n_seqs, tp))
        layers = L
        if self.overlap and pool_path > 0:
            layers = 2 * L  # each micro-batch launches every layer
            # Ping-pong: the step is the busier side's total, or one micro-batch's own chain.
            dense_c, dense_ar = (2 * x for x in cost.dense_layer(tokens / 2, tp))
            base_total = L * (dense_c + dense_ar + local + merge + driver_extra) + lm
            chain = (L * (dense_c + dense_ar + merge + driver_extra + max(local, pool_path)) + lm) / 2
            step = max(base_total, L * pool_path, chain)
        else:
            dense_c, dense_ar = cost.dense_layer(tokens, tp)
            step = L * (dense_c + dense_ar + max(local, pool_path) + merge + driver_extra) + lm
        step += step_extra
        # Steps that use the pool run eagerly in the engine; the others may replay graphs.
        graphs = pool_path == 0 and tp == 1 and tokens <= n_seqs
        return float(cost.finish_step(step, n_seqs, kv_tokens, graphs, layers)), dense_c, dense_ar

    def describe(self) -> str:
        if self.name == "head-parallel":
            return f"head-parallel TP{self.base_tp} + {self.pool_size} attn GPUs{self._tail(self.overlap)}"
        return (f"FA Pool TP{self.base_tp} + {self.pool_size} pool, threshold {self.threshold}, "
                f"{self.mode}{self._tail(self.overlap)}")

    def engine_args(self) -> dict:
        return {"tensor_parallel_size": self.base_tp, "attention_workers": self.pool_size,
                "pool_threshold": self.threshold, "tokens_per_pool_worker": self.tokens_per_worker,
                "pool_mode": self.mode}


def head_parallel(dense_tp: int = 8, attn_workers: int = 8, overlap: bool = True, **kw) -> FAPool:
    """Lamina-style attention offload: all KV on attention workers, split by head."""
    return FAPool(base_tp=dense_tp, pool_size=attn_workers, threshold=0, tokens_per_worker=1 << 30, mode="head",
                  overlap=overlap, name="head-parallel", **kw)


@dataclass
class AFD(Strategy):
    """An rA-1F bundle: r attention GPUs, one FFN instance of f_tp GPUs."""

    r: int = 8
    f_tp: int = 1
    max_batch_per_attn: int = 64
    overlap: bool = True
    replicas: int = 1
    name: str = "afd"

    def validate(self, cost: CostModel) -> None:
        if self.r < 1 or self.f_tp < 1 or self.max_batch_per_attn < 1 or self.replicas < 1:
            raise SimInputError("afd needs r, f_tp, max_batch_per_attn, replicas >= 1")
        if self.attn_capacity(cost) < 1:
            raise SimInputError(f"{self.describe()}: attention weights leave no room for KV")
        if cost.hw.kv_budget_bytes < (cost.weight_bytes("ffn") + cost.weight_bytes("embed")) / self.f_tp:
            raise SimInputError(f"{self.describe()}: FFN weights do not fit on {self.f_tp} GPU(s)")

    def num_gpus(self) -> int:
        return self.r + self.f_tp

    def gpu_labels(self) -> list[str]:
        return [f"attn{i}" for i in range(self.r)] + [f"ffn{i}" for i in range(self.f_tp)]

    def num_groups(self) -> int:
        return self.r

    def slots_per_group(self) -> int:
        return self.max_batch_per_attn

    def attn_capacity(self, cost: CostModel) -> int:
        free = cost.hw.kv_budget_bytes - cost.weight_bytes("attn")
        return kv_capacity_tokens(free, cost.kv_bytes_per_token())

    def make_ledger(self, cost, num_slots, group_of_slot):
        return GroupLedger(self.attn_capacity(cost), self.r, group_of_slot)

    def attn_layer(self, cost: CostModel, tokens, kv_read, pairs):
        """Per attention GPU, one layer: (compute, network) seconds. Arrays allowed."""
        split = 2 if self.overlap else 1
        gemm = split * (cost.qkv_proj(np.asarray(tokens) / split) + cost.o_proj(np.asarray(tokens) / split))
        compute = gemm + cost.attention(kv_read, pairs, tokens) + cost.layer_misc(tokens)
        # Its send and receive each micro-batch; with overlap the FFN side computes beside it.
        compute = (compute + split * cost.exchange()) * cost.concurrency(self.r + self.f_tp * (split - 1))
        return compute, cost.p2p(cost.hidden_bytes(tokens), self.same_node(cost))

    def ffn_layer(self, cost: CostModel, tokens: float) -> tuple[float, float, float]:
        """The FFN instance, one layer: (compute, all-reduce, network) seconds; its f_tp NICs share
        the activations."""
        split = 2 if self.overlap else 1
        compute = split * (float(cost.ffn(tokens / split, self.f_tp)) + cost.exchange())
        compute *= cost.concurrency(self.f_tp + self.r * (split - 1))
        ar = split * float(cost.allreduce(cost.hidden_bytes(tokens / split), self.f_tp))
        net = split * float(cost.p2p(cost.hidden_bytes(tokens / split) / self.f_tp, self.same_node(cost)))
        return compute, ar, net

    def combine(self, cost: CostModel, a_side, a_net, f: tuple[float, float, float], n_seqs: float,
                kv_tokens: float = 0.0):
        """Step seconds from one layer's slowest attention GPU (`a_side`, may be an array) and the FFN
        instance's parts. Shared with afd.py."""
        f_compute, f_ar, f_net = f
        L = cost.model.num_hidden_layers
        lm = float(cost.lm_head(n_seqs, self.f_tp))
        if self.overlap:
            # Ping-pong: the busier side's total plus the pipeline's fill or drain, or one
            # micro-batch's own chain (half of each side plus two transfers a layer).
            a_tot = L * np.asarray(a_side)
            f_tot = L * max(f_compute + f_ar, f_net) + lm
            drain = (f_compute + f_ar + f_net) / 2 + lm
            fill = np.asarray(a_side) / 2 + f_net / 2
            chain = (a_tot + L * (f_compute + f_ar + 2 * f_net) + lm) / 2
            step = np.maximum(np.maximum(a_tot + drain, f_tot + fill), chain)
        else:
            step = L * (np.asarray(a_side) + f_compute + f_ar + 2 * np.maximum(f_net, a_net)) + lm
        return cost.finish_step(step + cost.rank_step(self.num_gpus()), n_seqs, kv_tokens)

    def step_cost(self, cost: CostModel, b: StepBatch, ledger) -> StepCost:
        L = cost.model.num_hidden_layers
        act = b.active
        end, mid = (b.ctx + b.new) * act, b.new * (b.ctx + (b.new + 1) / 2.0)
        kv_a, pairs_a, tok_a = (np.bincount(b.group, weights=w, minlength=self.r) for w in (end, mid, b.new))
        a_compute, a_net = map(np.asarray, self.attn_layer(cost, tok_a, kv_a, pairs_a))
        f = self.ffn_layer(cost, float(tok_a.sum()))
        a_max = np.max(np.maximum(a_compute, a_net) if self.overlap else a_compute)
        duration = float(self.combine(cost, a_max, a_net.max(), f, float(act.sum()), float(kv_a.sum())))
        lm = float(cost.lm_head(float(act.sum()), self.f_tp))
        busy = np.concatenate([L * a_compute, np.full(self.f_tp, L * f[0] + lm)])
        comm = np.concatenate([L * 2 * a_net, np.full(self.f_tp, L * (f[1] + 2 * f[2]))])
        return StepCost(duration, busy, comm)

    def describe(self) -> str:
        seqs = f"{self.max_batch_per_attn} seqs/attn GPU"
        return f"AFD {self.r}A-1F(TP{self.f_tp}), {seqs}{self._tail(self.overlap)}"

    def engine_args(self) -> dict:
        return {"afd_attention_ranks": self.r, "afd_ffn_ranks": self.f_tp}
