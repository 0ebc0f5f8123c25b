"""Closed-form sizing of AFD rA-1F bundles (seed 002): decode contexts as a renewal process, the largest
of r sums of b slots' contexts (skew-matched gamma), and the r maximising r b / (E[step(r)] (r + f_tp));
derivation in docs/afd_ratio.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.strategies import AFD

@dataclass(frozen=True)
class ContextMoments:
    """Moments of X, the KV tokens one decode slot's attention reads at a random step."""

    mean: float
    var: float
    mean_prompt: float
    mean_output: float
    skew: float = 0.0

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.var, 0.0))


def context_moments(prompt: np.ndarray, output: np.ndarray) -> ContextMoments:
    """Exact length-biased moments for the empirical (prompt, output) distribution."""
    p, d = (np.asarray(v, dtype=np.float64) for v in (prompt, output))
    ed = d.mean()
    # Power sums over the request's steps j = 1..D of (P + j)^k.
    s1 = d * (d + 1) / 2
    s2 = d * (d + 1) * (2 * d + 1) / 6
    s3 = s1 * s1
    m1 = (d * p + s1).mean() / ed
    m2 = (d * p * p + 2 * p * s1 + s2).mean() / ed
    m3 = (d * p**3 + 3 * p * p * s1 + 3 * p * s2 + s3).mean() / ed
    var = m2 - m1 * m1
    third = m3 - 3 * m1 * m2 + 2 * m1**3
    skew = third / var**1.5 if var > 0 else 0.0
    return ContextMoments(float(m1), float(var), float(p.mean()), float(ed), float(skew))


def stationary_context_sample(prompt: np.ndarray, output: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n draws of X (for planners that need a distribution, not just moments)."""
    rng = np.random.default_rng(seed)
    p, d = np.asarray(prompt), np.asarray(output, dtype=np.float64)
    idx = rng.choice(len(d), size=n, p=d / d.sum())
    return p[idx] + np.floor(rng.random(n) * d[idx]).astype(np.int64) + 1


_Z = np.linspace(-8.0, 9.0, 1201)
_PDF = np.exp(-0.5 * _Z * _Z) / math.sqrt(2 * math.pi)  # the standard normal's density and CDF on _Z
_CDF = (1.0 + np.array([math.erf(z / math.sqrt(2.0)) for z in _Z])) / 2.0


@lru_cache(maxsize=4096)
def _max_weights(r: int) -> np.ndarray:
    dens = r * _PDF * _CDF ** (r - 1)
    return dens / dens.sum()


def max_of_sums_distribution(m: ContextMoments, b: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights): a discretised distribution of max over r GPUs of the sum of b slots' X."""
    if (g := m.skew / math.sqrt(b)) > 0.02:
        k = 4.0 / (g * g)
        cube = np.maximum(1.0 - 1.0 / (9.0 * k) + _Z / (3.0 * math.sqrt(k)), 0.0) ** 3
        z = math.sqrt(k) * (cube - 1.0)  # standardised: (Gamma(k) - k) / sqrt(k)
    else:
        z = _Z
    return b * m.mean + m.sd * math.sqrt(b) * z, _max_weights(r)


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
            s0, ds = self.b * self.m.mean, max(self.sum_sd, 1.0)
            at = [bundle.attn_layer(self.cost, self.b, s, s) for s in (s0, s0 + ds)]  # (compute, network)
            a0, a1 = (float(max(c, n) if self.overlap else c) for c, n in at)
            self._a_cache[key] = (a0, (a1 - a0) / ds, float(at[0][1]))
        return self._a_cache[key]

    def point(self, r: int) -> AFDPoint:
        # E[step] over the distribution of the slowest attention GPU (the step is a max of terms).
        n, bundle = r * self.b, self._bundle(r)
        s_max, w = max_of_sums_distribution(self.m, self.b, r)
        a_mean, alpha, a_net = self._a_terms(r)
        a_max = a_mean + alpha * (s_max - self.b * self.m.mean)
        steps = bundle.combine(self.cost, a_max, a_net, bundle.ffn_layer(self.cost, n), n, n * self.m.mean)
        step = float((np.asarray(steps) * w).sum())
        return AFDPoint(r, step, n / (step * (r + self.f_tp)))

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
