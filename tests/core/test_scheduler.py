"""Scheduler: token budget and chunked prefill, FCFS admission, max_num_seqs, preemption."""

from fapool.config import SchedulerConfig
from fapool.core.block_pool import BlockPool
from fapool.core.kv_cache_manager import KVCacheManager
from fapool.core.scheduler import Scheduler
from fapool.request import Request, RequestStatus
from fapool.sampling_params import SamplingParams


def _sched(num_blocks=64, budget=16, max_seqs=8):
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching=False), block_size=4)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv, 1024)


def _req(rid, n):
    return Request(rid, list(range(3, 3 + n)), SamplingParams(), max_tokens=100)


def _finish_step(out):
    """What the engine does after a step: count computed tokens, append a token where due."""
    for s in out.scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        if s.completes_known_tokens:
            s.request.append_token(7)


def test_chunked_prefill_under_budget_decodes_first():
    s = _sched(budget=16)
    a, b = _req("a", 10), _req("b", 30)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10), ("b", 6)]
    _finish_step(out)
    out = s.schedule()  # a decodes (1 token), b gets the rest of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 15)]
    assert not out.scheduled[1].completes_known_tokens
    _finish_step(out)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.scheduled[1].completes_known_tokens


def test_max_num_seqs_limits_admission():
    s = _sched(budget=100, max_seqs=2)
    for i in range(3):
        s.add(_req(str(i), 4))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]
    assert [r.request_id for r in s.waiting] == ["2"]


def test_preemption_takes_the_newest_and_requeues_it_first():
    s = _sched(num_blocks=4, budget=64)
    a, b = _req("a", 8), _req("b", 8)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert len(out.scheduled) == 2 and s.kv.pool.num_free_blocks == 0
    _finish_step(out)  # both need a third block for their next token now
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.num_preemptions == 1
    # b is recomputed with its sampled token once a finishes.
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 9)]
