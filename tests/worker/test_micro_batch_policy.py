"""MicroBatchPolicy: the micro-batch count of a pool step, chosen from measured step times."""

from fapool.worker.step_plan import MicroBatchPolicy


def _run(policy, times, steps, shape=(4, 4, 4096)):
    """Drive the policy for `steps` steps whose time depends only on the count it picks."""
    picks = []
    for _ in range(steps):
        m = policy.choose(*shape)
        picks.append(m)
        policy.record(*shape, m, times[m])
    return picks


def test_probes_each_count_then_keeps_the_fastest():
    policy = MicroBatchPolicy(probes=2, retry=1000)
    picks = _run(policy, {1: 0.10, 2: 0.06}, 20)
    assert picks[:4] == [1, 1, 2, 2]  # two samples of each first
    assert set(picks[4:]) == {2}
    policy = MicroBatchPolicy(probes=2, retry=1000)
    assert set(_run(policy, {1: 0.05, 2: 0.08}, 20)[4:]) == {1}


def test_retries_the_other_count_and_follows_a_change():
    policy = MicroBatchPolicy(probes=1, retry=8, window=3)
    shape = (4, 4, 4096)
    picks = _run(policy, {1: 0.05, 2: 0.08}, 16, shape)
    assert picks.count(2) == 1 + 2  # the probe, then once every 8 steps (steps 8 and 16)
    # Two micro-batches become cheaper (say, a longer context in the same bucket): the retries
    # see it, and once its recent median is lower it wins.
    picks = _run(policy, {1: 0.05, 2: 0.01}, 40, shape)
    assert picks[-8:].count(2) == 7  # and 1 is tried again once every 8 steps


def test_buckets_are_separate_and_one_sequence_is_never_split():
    policy = MicroBatchPolicy(probes=1, retry=1000)
    _run(policy, {1: 0.05, 2: 0.08}, 6, shape=(4, 4, 100))
    assert policy.choose(4, 4, 100) == 1
    assert policy.choose(4, 4, 8000) == 1  # a new bucket: probes again, 1 first ...
    policy.record(4, 4, 8000, 1, 0.5)
    assert policy.choose(4, 4, 8000) == 2  # ... then 2
    assert policy.choose(1, 1, 8000) == 1


def test_a_fixed_count_is_kept_and_capped_by_the_sequences():
    policy = MicroBatchPolicy(fixed=2)
    assert _run(policy, {1: 0.01, 2: 1.0}, 5) == [2] * 5
    assert policy.choose(1, 1, 10) == 1
    assert MicroBatchPolicy(fixed=1).choose(8, 8, 10) == 1


def test_a_one_off_slow_step_does_not_decide():
    """A kernel compiling (or a busy machine) makes one probe of the faster count slow: the
    best of its recent steps still wins."""
    policy = MicroBatchPolicy(probes=2, retry=1000)
    shape = (4, 4, 4096)
    for count, seconds in [(1, 0.50), (1, 0.05), (2, 0.08), (2, 0.08)]:
        assert policy.choose(*shape) == count
        policy.record(*shape, count, seconds)
    assert policy.choose(*shape) == 1
