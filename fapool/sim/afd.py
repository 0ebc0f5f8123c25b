"""Closed-form sizing of AFD rA-1F bundles (seed 002): the r maximising r b / (E[step(r)] (r + f_tp));
derivation in docs/afd_ratio.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.queueing import ContextMoments, context_moments, max_of_sums_distribution
from fapool.sim.strategies import AFD


@dataclass(frozen=True)
class AFDPoint:
    r: int
    step_time: float  # expected seconds per decode step (= TPOT in steady state)
    throughput_per_gpu: float  # tokens/s/GPU


@dataclass(frozen=True)
class AFDPlan:
    best: AFDPoint
    curve: list[AFDPoint]


class AFDModel:
    """Closed-form expected step time and throughput of an rA-1F bundle."""

    def __init__(self, cost: CostModel, moments: ContextMoments, b: int, f_tp: int = 1, overlap: bool = True):
        if b < 1 or f_tp < 1:
            raise SimInputError("AFD needs b >= 1 sequences per attention GPU and f_tp >= 1")
        self.cost, self.m, self.b, self.f_tp, self.overlap = cost, moments, b, f_tp, overlap
        self.sum_sd = moments.sd * math.sqrt(b)
        self._a_cache: dict[bool, tuple[float, float, float]] = {}

    def _bundle(self, r: int) -> AFD:
        return AFD(r=r, f_tp=self.f_tp, max_batch_per_attn=self.b, overlap=self.overlap)

    def _a_terms(self, r: int) -> tuple[float, float, float]:
        """(mean layer time, slope in S, network time) of one attention GPU, linearised at the mean."""
        bundle = self._bundle(r)
        key = bundle.same_node(self.cost)  # NVLink inside one node, the NIC otherwise
        if key not in self._a_cache:
            s0 = self.b * self.m.mean
            ds = max(self.sum_sd, 1.0)

            def a_side(s: float) -> float:
                compute, net = bundle.attn_layer(self.cost, self.b, s, s)
                return float(max(compute, net) if self.overlap else compute)

            a0 = a_side(s0)
            net = float(bundle.attn_layer(self.cost, self.b, s0, s0)[1])
            self._a_cache[key] = (a0, (a_side(s0 + ds) - a0) / ds, net)
        return self._a_cache[key]

    def point(self, r: int) -> AFDPoint:
        # E[step] over the distribution of the slowest attention GPU (the step is a max of terms).
        s_max, w = max_of_sums_distribution(self.m, self.b, r)
        a_mean, alpha, a_net = self._a_terms(r)
        a_max = a_mean + alpha * (s_max - self.b * self.m.mean)
        bundle = self._bundle(r)
        f_parts = bundle.ffn_layer(self.cost, r * self.b)
        steps = bundle.combine(self.cost, a_max, a_net, f_parts, r * self.b, r * self.b * self.m.mean)
        step = float((np.asarray(steps) * w).sum())
        n = r * self.b
        thr = n / (step * (r + self.f_tp))
        return AFDPoint(r, step, thr)

    def optimise(self, r_max: int = 4096) -> AFDPlan:
        curve: list[AFDPoint] = []
        best: AFDPoint | None = None
        for r in range(1, r_max + 1):
            p = self.point(r)
            curve.append(p)
            if best is None or p.throughput_per_gpu > best.throughput_per_gpu:
                best = p
            elif r > 2 * best.r + 8 and p.throughput_per_gpu < 0.8 * best.throughput_per_gpu:
                break  # well past the peak: Theta only falls from here
        assert best is not None
        return AFDPlan(best, curve)


def length_moments(prompt, output, seed: int = 0) -> ContextMoments:
    """The context moments of a (prompt, output) length distribution, from 200,000 draws."""
    rng = np.random.default_rng([seed, 17])
    return context_moments(prompt.sample(rng, 200_000), output.sample(rng, 200_000))
