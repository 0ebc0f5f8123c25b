"""Closed-form planner: size static TP x PP, FA Pool, head-parallel and AFD for a TPOT SLO (mean-field
steps priced by the simulator's formulas), check each by a short simulation, and say which to deploy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fapool.sim.afd import AFDModel, ContextMoments, context_moments, stationary_context_sample
from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.results import SimResult
from fapool.sim.simulator import SimConfig, simulate
from fapool.sim.strategies import AFD, FAPool, StaticTPPP, Strategy, head_parallel
from fapool.sim.workload import ClosedLoopWorkload, LengthDist


@dataclass
class PlanRow:
    kind: str  # static | fapool | head-parallel | afd
    strategy: Strategy
    batch: int  # sequences in flight per instance
    tpot: float  # predicted mean TPOT (s)
    throughput_per_gpu: float  # predicted tokens/s/GPU
    notes: str = ""
    sim: SimResult | None = None

    @property
    def gpus(self) -> int:
        return self.strategy.num_gpus()

    @property
    def gpu_seconds_per_token(self) -> float:
        return 1.0 / self.throughput_per_gpu


@dataclass
class Plan:
    rows: list[PlanRow]
    recommended: int  # index into rows
    tpot_slo: float
    moments: ContextMoments


@dataclass(frozen=True)
class PlannerInputs:
    cost: CostModel
    prompt: np.ndarray  # sample of prompt lengths
    output: np.ndarray  # sample of output lengths
    tpot_slo: float  # seconds
    max_gpus: int = 40  # per instance
    max_batch: int = 1024  # per instance (static, FA Pool)
    max_batch_per_attn: int = 256  # AFD
    tokens_per_worker: int = 4096
    headroom: float = 0.9  # plan mean TPOT <= headroom * SLO
    kv_sigmas: float = 3.0  # KV must fit mean + this many sd of the batch's total context


def _kv_batch_limit(m: ContextMoments, capacity: float, z: float, cap: int) -> int:
    """Largest B with B*mean + z*sd*sqrt(B) <= capacity (quadratic in sqrt(B))."""
    if capacity <= 0:
        return 0
    a, bq, c = m.mean, z * m.sd, -capacity
    root = (-bq + math.sqrt(bq * bq - 4 * a * c)) / (2 * a)
    return int(min(cap, math.floor(root * root)))


def _largest(ok, limit: int) -> int:
    """Largest B in [1, limit] with ok(B), for ok true up to some B and false after; 0 if none."""
    if limit < 1 or not ok(1):
        return 0
    lo, hi = 1, limit
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _tp_options(inp: PlannerInputs) -> list[int]:
    m, hw = inp.cost.model, inp.cost.hw
    return [t for t in (1, 2, 4, 8, 16) if t <= min(m.num_attention_heads, hw.gpus_per_node, inp.max_gpus)]


def _best_row(inp: PlannerInputs, options) -> PlanRow | None:
    """The row of the most tokens/s/GPU over `options` (strategy, the most sequences its KV holds, its
    TPOT at a batch), each at the largest batch within the SLO."""
    target, best = inp.tpot_slo * inp.headroom, None
    for s, limit, tpot in options:
        B = _largest(lambda b, tpot=tpot: tpot(b) <= target, limit)
        if B < 1:
            continue
        row = PlanRow(s.name, dataclasses.replace(s, max_batch=B), B, tpot(B), B / (tpot(B) * s.num_gpus()))
        if best is None or row.throughput_per_gpu > best.throughput_per_gpu:
            best = row
    return best


def plan_static(inp: PlannerInputs, m: ContextMoments) -> PlanRow | None:
    cost, L = inp.cost, inp.cost.model.num_hidden_layers
    grid = [StaticTPPP(tp=tp, pp=pp) for tp in _tp_options(inp) for pp in range(1, min(L, 8) + 1)
            if L % pp == 0 and tp * pp <= inp.max_gpus]
    return _best_row(inp, [(s, _kv_batch_limit(m, s.kv_capacity(cost), inp.kv_sigmas, inp.max_batch),
                            lambda B, s=s: s.timing(cost, B, B, B * m.mean, B * m.mean)[0]) for s in grid])


class _PoolMeanField:
    """FA Pool step time for B sequences with contexts ~ X, loads spread evenly."""

    def __init__(self, inp: PlannerInputs, x: np.ndarray):
        self.inp, self.cost, self.x = inp, inp.cost, x
        self._cache: dict[tuple[int, int], tuple[float, float, float, float]] = {}

    def stats(self, threshold: int, P: int) -> tuple[float, float, float, float]:
        """(E[min(X, th)], E[(X - th)+], P(X > th), E[workers per pool sequence])."""
        key = (threshold, P)
        if key not in self._cache:
            over = np.maximum(self.x - threshold, 0)
            k = np.minimum(P, np.ceil(over / self.inp.tokens_per_worker)) if P else np.zeros_like(over)
            q = float((over > 0).mean())
            e_k = float(k[over > 0].mean()) if q > 0 else 0.0
            self._cache[key] = (float(np.minimum(self.x, threshold).mean()), float(over.mean()), q, e_k)
        return self._cache[key]

    def step(self, s: FAPool, B: float) -> float:
        cost, tp, P = self.cost, s.base_tp, s.pool_size
        e_loc, e_pool, q, e_k = self.stats(s.threshold, P)
        local = float(cost.attention(B * e_loc, B * e_loc, B, 1.0 / tp)) if e_loc > 0 else 0.0
        pool_path = merge = driver_extra = step_extra = 0.0
        if P and e_pool > 0:
            # With calibrated pool terms each micro-batch is its own call on a worker (as the
            # simulator prices it); the terms and contention come from FAPool.remote_layer.
            n_mb = 2 if s.overlap and cost.hw.pool is not None else 1
            # Per worker: the KV it reads, its queries, its share of the heads, the new tokens' KV.
            if s.mode == "head":  # every pool sequence, 1/P of the heads (P divides the KV heads here)
                share, kv_w, queries = 1.0 / P, B * e_pool, B * q
                new_kv = B * q * cost.kv_bytes_per_token_layer() * share
            else:
                share, kv_w, queries = 1.0, B * e_pool / P, B * q * e_k / P
                new_kv = B * q / P * cost.kv_bytes_per_token_layer()
            attn = n_mb * float(cost.attention(kv_w / n_mb, kv_w / n_mb, queries / n_mb, share))
            q_w = float(cost.query_bytes(queries, share)) + new_kv
            r_w = float(cost.partial_bytes(queries, share))
            counts = (np.full(P, float(n_mb)), np.full(P, queries), n_mb * P, n_mb, n_mb)
            pool_path, merge, driver_extra, step_extra, _, _ = s.remote_layer(
                cost, np.full(P, attn), np.full(P, q_w), np.full(P, r_w), counts)
        elif P and cost.hw.pool is not None:
            driver_extra = cost.hw.pool.driver_layer(1, 0, 0)
        kv = B * (e_loc + e_pool)
        return s.step_time(cost, B, B, local, pool_path, merge, kv, driver_extra, step_extra)[0]

    def fits(self, s: FAPool, B: int, m_sd: float) -> bool:
        e_loc, e_pool, _, _ = self.stats(s.threshold, s.pool_size)
        z = self.inp.kv_sigmas * m_sd * math.sqrt(B)
        if B * e_loc + (z if e_loc else 0) > s.base_capacity(self.cost):
            return False
        return B * e_pool + (z if e_pool else 0) <= s.pool_size * s.worker_capacity(self.cost) * 0.95


def _pool_search(inp: PlannerInputs, mf: _PoolMeanField, m: ContextMoments, make) -> PlanRow | None:
    """The best of the pools make(tp) gives for each base TP >= 2 (tokens/s/GPU within the SLO)."""
    pools = [s for tp in _tp_options(inp) if tp >= 2 for s in make(tp) if s.num_gpus() <= inp.max_gpus]
    return _best_row(inp, [(s, _largest(lambda b, s=s: mf.fits(s, b, m.sd), inp.max_batch),
                            lambda b, s=s: mf.step(s, b)) for s in pools])


def pool_balance_size(mf: _PoolMeanField, base_tp: int, threshold: int, tokens_per_worker: int, B: int,
                      p_max: int, tolerance: float = 0.02) -> int | None:
    """The smallest pool whose mean-field step is within `tolerance` of an unbounded pool's (past it the
    base GPUs set the pace: the seed's plateau)."""
    step = lambda P: mf.step(FAPool(base_tp=base_tp, pool_size=P, threshold=threshold,
                                    tokens_per_worker=tokens_per_worker), B)
    ref = step(p_max)
    return next((P for P in range(1, p_max + 1) if step(P) <= (1 + tolerance) * ref), None)


def plan_fapool(inp: PlannerInputs, m: ContextMoments, x: np.ndarray) -> PlanRow | None:
    mf = _PoolMeanField(inp, x)
    top = int(np.percentile(x, 99))
    thresholds = sorted({t for t in (512, 1024, 2048, 4096, 8192, 16384, 32768) if t < top}
                        | {inp.tokens_per_worker})
    make = lambda tp: [FAPool(base_tp=tp, pool_size=P, threshold=th, tokens_per_worker=inp.tokens_per_worker)
                       for th in thresholds for P in range(1, inp.max_gpus - tp + 1)]
    if (row := _pool_search(inp, mf, m, make)) is not None:
        s, B = row.strategy, row.batch
        p_star = pool_balance_size(mf, s.base_tp, s.threshold, s.tokens_per_worker, B, inp.max_gpus * 4)
        row.notes = f"threshold {s.threshold}, balance pool size P*={p_star}"
    return row


def plan_head_parallel(inp: PlannerInputs, m: ContextMoments, x: np.ndarray) -> PlanRow | None:
    kvh = inp.cost.model.num_key_value_heads
    make = lambda tp: [head_parallel(dense_tp=tp, attn_workers=P) for P in range(1, kvh + 1) if kvh % P == 0]
    if (row := _pool_search(inp, _PoolMeanField(inp, x), m, make)) is not None:
        row.notes = "all KV on attention GPUs, split by head"
    return row


def plan_afd(inp: PlannerInputs, m: ContextMoments) -> PlanRow | None:
    cost, target = inp.cost, inp.tpot_slo * inp.headroom
    best: PlanRow | None = None
    for f_tp in [t for t in _tp_options(inp) if t < inp.max_gpus]:  # room for an attention GPU
        probe = AFD(r=1, f_tp=f_tp)
        try:
            probe.validate(cost)
        except SimInputError:
            continue
        b_kv = _kv_batch_limit(m, probe.attn_capacity(cost), inp.kv_sigmas, inp.max_batch_per_attn)
        for b in sorted({x for x in (8, 16, 32, 64, 128, 256, 512, b_kv) if 0 < x <= b_kv}):
            plan = AFDModel(cost, m, b, f_tp).optimise(r_max=inp.max_gpus - f_tp)
            ok = [p for p in plan.curve if p.step_time <= target]
            if not ok:
                continue
            pt = max(ok, key=lambda p: p.throughput_per_gpu)
            row = PlanRow("afd", AFD(r=pt.r, f_tp=f_tp, max_batch_per_attn=b), pt.r * b, pt.step_time,
                          pt.throughput_per_gpu, f"r*={plan.best.r} (unconstrained), b={b}")
            if best is None or row.throughput_per_gpu > best.throughput_per_gpu:
                best = row
    return best


def make_plan(inp: PlannerInputs, prompt_dist: LengthDist | None = None,
              output_dist: LengthDist | None = None, verify_steps: int = 300, seed: int = 0) -> Plan:
    if inp.tpot_slo <= 0 or not math.isfinite(inp.tpot_slo):
        raise SimInputError(f"TPOT SLO must be a positive number of seconds, got {inp.tpot_slo}")
    m = context_moments(inp.prompt, inp.output)
    x = stationary_context_sample(inp.prompt, inp.output, 50_000, seed)
    rows = [plan_static(inp, m), plan_fapool(inp, m, x), plan_head_parallel(inp, m, x), plan_afd(inp, m)]
    rows = [r for r in rows if r is not None]
    if not rows:
        fastest = StaticTPPP(tp=_tp_options(inp)[-1], pp=1)
        t1 = fastest.timing(inp.cost, 1, 1, m.mean, m.mean)[0]
        raise SimInputError(
            f"TPOT SLO {inp.tpot_slo * 1e3:g} ms cannot be met on {inp.cost.hw.name}: even one sequence at the "
            f"workload's mean context ({m.mean:.0f} tokens) needs {t1 * 1e3:.2f} ms per token with "
            f"TP{fastest.tp} (planning at {inp.headroom:.0%} of the SLO)"
        )
    if verify_steps > 0:
        if prompt_dist is None or output_dist is None:
            raise ValueError("verification needs the length distributions")
        for row in rows:  # simulated at its planned concurrency, steady state from t=0
            wl = ClosedLoopWorkload(prompt_dist, output_dist, row.batch, num_requests=10**9, seed=seed)
            cfg = SimConfig(prefill="skip", max_sim_time=verify_steps * row.tpot)
            row.sim = simulate(row.strategy, inp.cost, wl, cfg)

    def score(r: PlanRow) -> tuple:
        meets = r.sim.slo_attainment(inp.tpot_slo) >= 0.9 if r.sim is not None else r.tpot <= inp.tpot_slo
        return meets, (r.sim.throughput_per_gpu if r.sim is not None else r.throughput_per_gpu)

    return Plan(rows, max(range(len(rows)), key=lambda i: score(rows[i])), inp.tpot_slo, m)


def plan_table(plan: Plan):
    from rich.table import Table

    t = Table(title=f"plan (closed form; 'sim' columns simulated), TPOT SLO {plan.tpot_slo * 1e3:g} ms")
    for col in ("", "strategy", "GPUs", "batch", "TPOT ms", "tok/s/GPU", "GPU-s/Mtok", "sim TPOT p50/p99 ms",
                "sim tok/s/GPU", "SLO met", "notes"):
        t.add_column(col, justify="left" if col in ("", "strategy", "notes") else "right")
    for i, r in enumerate(plan.rows):
        sim_tpot = sim_thr = att = "-"
        if r.sim is not None and len(r.sim.tpot):
            sim_tpot = f"{np.percentile(r.sim.tpot, 50) * 1e3:.2f}/{np.percentile(r.sim.tpot, 99) * 1e3:.2f}"
            sim_thr = f"{r.sim.throughput_per_gpu:,.0f}"
            att = f"{r.sim.slo_attainment(plan.tpot_slo):.0%}"
        t.add_row("*" if i == plan.recommended else "", r.strategy.describe(), str(r.gpus), str(r.batch),
                  f"{r.tpot * 1e3:.2f}", f"{r.throughput_per_gpu:,.0f}",
                  f"{r.gpu_seconds_per_token * 1e6:,.1f}", sim_tpot, sim_thr, att, r.notes)
    return t
