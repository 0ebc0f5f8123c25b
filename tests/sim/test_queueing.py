"""The planner's probability, checked against Monte Carlo."""

import dataclasses
import math

import numpy as np
import pytest

from fapool.sim.afd import (
    ContextMoments,
    context_moments,
    max_of_sums_distribution,
    stationary_context_sample,
)


def expected_max_of_sums(m: ContextMoments, b: int, r: int) -> tuple[float, float]:
    """(E, SD) of the max over r GPUs of the sum of b slots' X, from the planner's distribution."""
    v, w = max_of_sums_distribution(m, b, r)
    e = float((v * w).sum())
    return e, float(math.sqrt(max(((v - e) ** 2 * w).sum(), 0.0)))


def _renewal_monte_carlo(rng, prompt_sampler, output_sampler, steps: int, slots: int) -> np.ndarray:
    """Run `slots` independent decode slots for `steps` steps; return X (tokens read) of every
    slot-step after a burn-in. A slot serves requests back to back, one token a step."""
    out = []
    for _ in range(slots):
        t = 0
        xs = []
        while t < steps:
            p, d = prompt_sampler(rng), output_sampler(rng)
            xs.extend(p + np.arange(d) + 1)
            t += d
        out.append(np.asarray(xs[steps // 4 : steps]))
    return np.concatenate(out)


def test_context_moments_match_renewal_monte_carlo():
    rng = np.random.default_rng(0)
    ps = lambda r: int(r.integers(100, 2000))
    ds = lambda r: int(np.clip(r.lognormal(np.log(80), 0.9), 1, 2000))
    x = _renewal_monte_carlo(rng, ps, ds, steps=20_000, slots=25)
    big = np.random.default_rng(1)
    m = context_moments(
        np.array([ps(big) for _ in range(200_000)]), np.array([ds(big) for _ in range(200_000)])
    )
    assert m.mean == pytest.approx(x.mean(), rel=0.02)
    assert m.sd == pytest.approx(x.std(), rel=0.03)
    # Length bias matters: the naive mean (prompt + output/2) is clearly smaller here.
    assert m.mean > m.mean_prompt + m.mean_output / 2 + 10


def test_stationary_sample_has_the_moments():
    rng = np.random.default_rng(2)
    p, d = rng.integers(1, 5000, 50_000), rng.integers(1, 500, 50_000)
    m = context_moments(p, d)
    x = stationary_context_sample(p, d, 200_000, seed=3)
    assert x.mean() == pytest.approx(m.mean, rel=0.01)
    assert x.std() == pytest.approx(m.sd, rel=0.02)


@pytest.mark.parametrize("r", [2, 5, 16, 64])
def test_max_of_normals_against_monte_carlo(r):
    """With no skew and one slot, the max-of-sums distribution is the max of r standard normals."""
    z = np.random.default_rng(r).standard_normal((100_000, r)).max(axis=1)
    e, s = expected_max_of_sums(ContextMoments(mean=0.0, var=1.0, mean_prompt=0.0, mean_output=1.0), 1, r)
    assert e == pytest.approx(z.mean(), abs=0.01)
    assert s == pytest.approx(z.std(), abs=0.01)


@pytest.mark.parametrize("b,r", [(32, 12), (8, 40), (2, 100), (128, 4)])
def test_expected_max_of_sums_for_skewed_lengths(b, r):
    """The straggler term: max over r GPUs of a sum of b slot contexts. The skew-matched
    approximation is within 1.5% of Monte Carlo for long-tailed lengths; the plain normal
    approximation (skew 0) is clearly low when b is small."""
    rng = np.random.default_rng(11)
    p = np.clip(rng.lognormal(np.log(1500), 0.8, 200_000), 1, 32768).astype(int)
    d = np.clip(rng.lognormal(np.log(200), 0.8, 200_000), 1, 4096).astype(int)
    m = context_moments(p, d)
    assert m.skew > 2  # long tail
    xs = stationary_context_sample(p, d, 6_000 * b * r, seed=5).reshape(6_000, r, b)
    mc = xs.sum(axis=2).max(axis=1)
    e, s = expected_max_of_sums(m, b, r)
    assert e == pytest.approx(mc.mean(), rel=0.015)
    assert s == pytest.approx(mc.std(), rel=0.25)
    e_normal, _ = expected_max_of_sums(dataclasses.replace(m, skew=0.0), b, r)
    assert abs(e_normal - mc.mean()) >= abs(e - mc.mean())
    if b <= 8:
        assert e_normal < 0.9 * mc.mean()
