"""Decode contexts as a renewal process and the largest of r sums of b slots' contexts (skew-matched
gamma), for the closed-form planner; derivation in docs/afd_ratio.md.
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
    skew: float = 0.0

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.var, 0.0))


def context_moments(prompt: np.ndarray, output: np.ndarray) -> ContextMoments:
    """Exact length-biased moments for the empirical (prompt, output) distribution."""
    p = np.asarray(prompt, dtype=np.float64)
    d = np.asarray(output, dtype=np.float64)
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
    p = np.asarray(prompt)
    d = np.asarray(output, dtype=np.float64)
    idx = rng.choice(len(d), size=n, p=d / d.sum())
    age = np.floor(rng.random(n) * d[idx]).astype(np.int64)
    return p[idx] + age + 1


_Z = np.linspace(-8.0, 9.0, 1201)


@lru_cache(maxsize=4096)
def _max_weights(r: int) -> np.ndarray:
    dens = r * norm_pdf(_Z) * norm_cdf(_Z) ** (r - 1)
    return dens / dens.sum()


def max_of_sums_distribution(m: ContextMoments, b: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights): a discretised distribution of max over r GPUs of the sum of b slots' X."""
    g = m.skew / math.sqrt(b)
    if g > 0.02:
        k = 4.0 / (g * g)
        cube = np.maximum(1.0 - 1.0 / (9.0 * k) + _Z / (3.0 * math.sqrt(k)), 0.0) ** 3
        z = math.sqrt(k) * (cube - 1.0)  # standardised: (Gamma(k) - k) / sqrt(k)
    else:
        z = _Z
    return b * m.mean + m.sd * math.sqrt(b) * z, _max_weights(r)
