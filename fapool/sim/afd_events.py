"""A layer-level event simulation of an rA-1F bundle (seed 002) that shares no step formula with the
closed form in afd.py (docs/afd_ratio.md). Decode only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from fapool.sim.afd import AFDModel, context_moments
from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.workload import LengthDist, steady_state_draw


@dataclass(frozen=True)
class BundleRun:
    r: int
    steps: int
    mean_step_s: float
    throughput_per_gpu: float  # tokens/s/GPU over the r + f_tp GPUs
    attention_busy: float  # mean fraction of the step an attention GPU computes
    ffn_busy: float  # fraction of the step the FFN instance computes


class _Slots:
    """Per-slot request trajectories; slot s draws from stream (seed, s) in every run (common random
    numbers across r)."""

    def __init__(self, n: int, prompt: LengthDist, output: LengthDist, seed: int):
        self.prompt_dist, self.output_dist = prompt, output
        self.rngs = [np.random.default_rng([seed, 11, s]) for s in range(n)]
        draws = [steady_state_draw(prompt, output, rng) for rng in self.rngs]
        self.prompt, self.output, self.age = (np.array(col, np.int64) for col in zip(*draws, strict=True))

    def context(self) -> np.ndarray:
        return self.prompt + self.age + 1  # cached tokens and the new one

    def advance(self) -> None:
        self.age += 1
        for s in np.flatnonzero(self.age >= self.output):
            rng = self.rngs[s]
            self.prompt[s] = self.prompt_dist.sample(rng, 1)[0]
            self.output[s] = self.output_dist.sample(rng, 1)[0]
            self.age[s] = 0


def _fifo_done(ready: np.ndarray, service: np.ndarray, free: float) -> float:
    """When a FIFO server, free from `free`, finishes jobs ready at `ready` taking `service`."""
    order = np.argsort(ready, kind="stable")
    tail = np.cumsum(service[order][::-1])[::-1]
    return float(max(free + tail[0], float((ready[order] + tail).max())))


def simulate_bundle(cost: CostModel, prompt: LengthDist, output: LengthDist, r: int, b: int, f_tp: int = 1,
                    overlap: bool = True, steps: int = 1000, seed: int = 0) -> BundleRun:
    """Run `steps` decode steps of an rA-1F bundle kept full (b slots per attention GPU)."""
    if r < 1 or b < 1 or f_tp < 1 or steps < 1:
        raise SimInputError("the AFD event simulation needs r, b, f_tp, steps >= 1")
    n_mb = 2 if overlap and b >= 2 else 1
    L = cost.model.num_hidden_layers
    link = cost.hw.link(r + f_tp <= cost.hw.gpus_per_node)
    cuts = np.linspace(0, b, n_mb + 1).round().astype(int)
    slots = _Slots(r * b, prompt, output, seed)
    # What does not change from step to step: [r, n_mb] micro-batch tokens, the projections
    # and small kernels on them, the bytes each GPU sends (and gets back) per layer, the FFN.
    tok = np.stack([np.full(r, float(hi - lo)) for lo, hi in itertools.pairwise(cuts)], axis=1)
    dense = cost.qkv_proj(tok) + cost.o_proj(tok) + cost.layer_misc(tok)
    sent = tok * cost.hidden_bytes(1)
    ffn = [float(cost.ffn(t, f_tp)) + float(cost.allreduce(cost.hidden_bytes(t), f_tp))
           for t in tok.sum(axis=0)]
    lm = float(cost.lm_head(r * b, f_tp))
    total_s = attn_busy = ffn_busy = 0.0
    for _ in range(steps):
        ctx = slots.context().reshape(r, b).astype(np.float64)
        kv = np.stack([ctx[:, lo:hi].sum(axis=1) for lo, hi in itertools.pairwise(cuts)], axis=1)
        attn = np.broadcast_to(np.asarray(dense + cost.attention(kv, kv, tok), dtype=np.float64), (r, n_mb))
        gpu_free = np.zeros(r)
        back = np.zeros((n_mb, r))  # when micro-batch m's previous layer is back on each GPU
        ffn_free = in_free = out_free = 0.0
        for layer in range(L):
            for m in range(n_mb):
                gpu_free = done = np.maximum(gpu_free, back[m]) + attn[:, m]
                # Each sender's own NIC, then the FFN instance's f_tp NICs in arrival order.
                own = done + sent[:, m] / link.bandwidth
                arrived = max(float(own.max()), _fifo_done(done, sent[:, m] / (f_tp * link.bandwidth), in_free))
                in_free = arrived
                ffn_free = max(ffn_free, arrived + link.latency) + ffn[m]
                if layer == L - 1:
                    continue
                start = max(ffn_free, out_free)
                shared = start + np.cumsum(sent[:, m]) / (f_tp * link.bandwidth)
                out_free = float(shared[-1])
                back[m] = np.maximum(shared, start + sent[:, m] / link.bandwidth) + link.latency
        step = float(cost.finish_step(ffn_free + lm, r * b, float(ctx.sum())))
        total_s += step
        attn_busy += L * float(attn.sum()) / r / step
        ffn_busy += (L * sum(ffn) + lm) / step
        slots.advance()
    mean = total_s / steps
    return BundleRun(r, steps, mean, r * b / (mean * (r + f_tp)), attn_busy / steps, ffn_busy / steps)


def regret_sweep(cost: CostModel, prompt: LengthDist, output: LengthDist, b: int, f_tp: int = 1,
                 overlap: bool = True, steps: int = 1000, span: float = 0.3, max_points: int = 9,
                 seed: int = 0) -> dict:
    """The closed form's r* against this simulation's best r over about r*(1 +- span) (widened while the
    best sits on an edge): the throughput lost at r*."""
    rng = np.random.default_rng([seed, 17])  # the closed form's moments from 200,000 draws
    moments = context_moments(prompt.sample(rng, 200_000), output.sample(rng, 200_000))
    plan = AFDModel(cost, moments, b, f_tp, overlap).optimise()
    r0 = plan.best.r
    lo, hi = max(1, int(r0 * (1 - span))), max(r0 + 1, math.ceil(r0 * (1 + span)))
    rs = set(np.unique(np.linspace(lo, hi, max_points).round().astype(int)).tolist())
    rs |= {r for r in (r0 - 1, r0, r0 + 1) if r >= 1}
    runs: dict[int, BundleRun] = {}
    while True:
        for r in sorted(rs - runs.keys()):
            runs[r] = simulate_bundle(cost, prompt, output, r, b, f_tp, overlap, steps, seed)
        best = max(runs, key=lambda r: runs[r].throughput_per_gpu)
        edge = [r for r in (best - 1, best + 1) if r >= 1 and r not in runs]
        if not edge or len(runs) >= 4 * max_points:
            break
        rs |= {best + 2 * (r - best) for r in edge if best + 2 * (r - best) >= 1} | set(edge)
    closed = {p.r: p.throughput_per_gpu for p in plan.curve}
    return {
        "r_closed_form": r0,
        "r_simulated": best,
        "throughput_regret": 1 - runs[r0].throughput_per_gpu / runs[best].throughput_per_gpu,
        "closed_form_vs_simulated_at_r_star": closed[r0] / runs[r0].throughput_per_gpu - 1,
        "closed_form_curve": {r: closed[r] for r in sorted(runs) if r in closed},
        "simulated_curve": {r: runs[r].throughput_per_gpu for r in sorted(runs)},
        "attention_busy_at_r_star": runs[r0].attention_busy,
        "ffn_busy_at_r_star": runs[r0].ffn_busy,
        "steps": steps,
    }
