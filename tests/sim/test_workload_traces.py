import math

import numpy as np
import pytest

from fapool.sim.errors import SimInputError
from fapool.sim.workload import (
    ClosedLoopWorkload,
    LengthDist,
    PoissonWorkload,
    TraceWorkload,
    load_azure_trace,
)


def test_length_specs():
    rng = np.random.default_rng(0)
    assert (LengthDist.parse("4096").sample(rng, 5) == 4096).all()
    u = LengthDist.parse("uniform:10,20").sample(rng, 1000)
    assert u.min() >= 10 and u.max() <= 20
    ln = LengthDist.parse("lognormal:1000,0.5", hi=1500).sample(rng, 20000)
    assert np.median(ln) == pytest.approx(1000, rel=0.05) and ln.max() == 1500
    assert set(LengthDist.parse("choice:1,5").sample(rng, 100)) == {1, 5}
    for bad in ("gauss:1", "uniform:5", "uniform:9,3", "exp:-1", "fixed:abc", "lognormal:1,2,3"):
        with pytest.raises(SimInputError, match="bad length distribution"):
            LengthDist.parse(bad)


def test_poisson_is_deterministic_and_has_the_rate():
    p, o = LengthDist.parse("100"), LengthDist.parse("exp:50")
    a = PoissonWorkload(p, o, rate=20.0, num_requests=4000, seed=3).initial()
    b = PoissonWorkload(p, o, rate=20.0, num_requests=4000, seed=3).initial()
    np.testing.assert_array_equal(a.arrival, b.arrival)
    np.testing.assert_array_equal(a.output_len, b.output_len)
    assert a.arrival[0] == 0 and np.all(np.diff(a.arrival) >= 0)
    assert (len(a) - 1) / a.arrival[-1] == pytest.approx(20.0, rel=0.05)
    burst = PoissonWorkload(p, o, rate=math.inf, num_requests=10).initial()
    assert (burst.arrival == 0).all()


def test_closed_loop_stationary_start_is_length_biased():
    wl = ClosedLoopWorkload(LengthDist.parse("100"), LengthDist.parse("choice:10,1000"), 4000, 4000, seed=1)
    first = wl.initial()
    assert first.warm.all() and (first.generated < first.output_len).all()
    # A slot is busy with a 1000-token request 100x longer than with a 10-token one.
    assert (first.output_len == 1000).mean() == pytest.approx(1000 / 1010, abs=0.01)
    assert wl.replenish(0, 1.0) is None  # num_requests already sent


def test_trace_round_trip_and_datetimes(tmp_path, write_trace):
    path = tmp_path / "t.csv"
    write_trace(path, [5.0, 1.0, 3.5], [100, 200, 300], [10, 0, 30])
    tr = load_azure_trace(path)
    np.testing.assert_allclose(tr.arrival, [0.0, 2.5, 4.0])
    np.testing.assert_array_equal(tr.prompt_len, [200, 300, 100])
    np.testing.assert_array_equal(tr.output_len, [1, 30, 10])  # 0 generated counts as 1
    az = tmp_path / "azure.csv"
    az.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    tr = load_azure_trace(az)
    assert tr.arrival[1] == pytest.approx(4.314579, abs=1e-5)
    wl = TraceWorkload(tr, speedup=2.0)
    assert wl.initial().arrival[1] == pytest.approx(2.1572895, abs=1e-5)


@pytest.mark.parametrize(
    "body,match",
    [
        ("TIMESTAMP,ContextTokens\n1,2\n", "lacks column"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\nx,2,3\n", r":3: malformed trace row"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,abc,3\n", r":2: malformed"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,0,3\n", "ContextTokens must be >= 1"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,5\n", "2 fields"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ],
)
def test_malformed_traces(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(SimInputError, match=match):
        load_azure_trace(path)


def test_missing_trace_file(tmp_path):
    with pytest.raises(SimInputError, match="not found"):
        load_azure_trace(tmp_path / "nope.csv")
