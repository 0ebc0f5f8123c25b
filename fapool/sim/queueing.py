"""The probability the closed-form planner rests on (derivation: docs/afd_ratio.md).

Decode slots are a renewal process: a slot holds one request for D steps (its output length),
then the next. At a random step a slot therefore holds a request with probability
proportional to D (length bias), at an age k uniform on 0..D-1, and the step's attention
reads X = P + k + 1 cached tokens (P = prompt). Summing over a request's steps:

    E[X]   = E[ D*P + D(D+1)/2 ] / E[D]
    E[X^2] = E[ D*P^2 + P*D(D+1) + D(D+1)(2D+1)/6 ] / E[D]

An attention GPU holding b independent slots reads S = X_1 + ... + X_b, about normal with mean
b*E[X] and variance b*Var[X]. A step of r such GPUs waits for the largest S: E[max of r]
= mean + sd * e_r, where e_r is the expected maximum of r standard normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_SQRT2 = math.sqrt(2.0)
_erf = np.frompyfunc(math.erf, 1, 1)


def norm_cdf(x):
    out = np.asarray(_erf(np.asarray(x, dtype=np.float64) / _SQRT2), dtype=np.float64)
    return ((1.0 + out) / 2.0)[()]


def norm_pdf(x):
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class ContextMoments:
    """Moments of X, the KV tokens one decode slot's attention reads at a random step."""

    mean: float
    var: float
    mean_prompt: float
    mean_output: float

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.var, 0.0))


def context_moments(prompt: np.ndarray, output: np.ndarray) -> ContextMoments:
    """Exact length-biased moments for the empirical (prompt, output) distribution."""
    p = np.asarray(prompt, dtype=np.float64)
    d = np.asarray(output, dtype=np.float64)
    ed = d.mean()
    m1 = (d * p + d * (d + 1) / 2).mean() / ed
    m2 = (d * p * p + p * d * (d + 1) + d * (d + 1) * (2 * d + 1) / 6).mean() / ed
    return ContextMoments(float(m1), float(m2 - m1 * m1), float(p.mean()), float(ed))


def stationary_context_sample(prompt: np.ndarray, output: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n draws of X (for planners that need a distribution, not just moments)."""
    rng = np.random.default_rng(seed)
    p = np.asarray(prompt)
    d = np.asarray(output, dtype=np.float64)
    idx = rng.choice(len(d), size=n, p=d / d.sum())
    age = np.floor(rng.random(n) * d[idx]).astype(np.int64)
    return p[idx] + age + 1


@lru_cache(maxsize=4096)
def max_normal_moments(r: int) -> tuple[float, float]:
    """(E, SD) of the maximum of r iid standard normals, by quadrature of r*phi*Phi^(r-1)."""
    if r < 1:
        raise ValueError("r must be >= 1")
    if r == 1:
        return 0.0, 1.0
    x = np.linspace(-9.0, 9.0, 6001)
    dens = r * norm_pdf(x) * norm_cdf(x) ** (r - 1)
    dx = x[1] - x[0]
    m = float((x * dens).sum() * dx)
    m2 = float((x * x * dens).sum() * dx)
    return m, math.sqrt(max(m2 - m * m, 0.0))


def expected_max_with_constant(mean: float, sd: float, c: float) -> float:
    """E[max(Y, c)] for Y ~ Normal(mean, sd^2)."""
    if sd <= 0:
        return max(mean, c)
    z = (mean - c) / sd
    return float(c + (mean - c) * norm_cdf(z) + sd * norm_pdf(z))


def expected_max_of_sums(m: ContextMoments, b: int, r: int) -> tuple[float, float]:
    """(E, SD) of max over r attention GPUs of S = sum of b slots' X (normal approximation)."""
    e, s = max_normal_moments(r)
    sd_sum = m.sd * math.sqrt(b)
    return b * m.mean + sd_sum * e, sd_sum * s


def little_concurrency(arrival_rate: float, mean_time_in_system: float) -> float:
    """Little's law: mean number in system = arrival rate x mean time in system."""
    return arrival_rate * mean_time_in_system
