"""Lamina's ping-pong (seed 004): with two micro-batches the dense rank posts one micro-batch's
q/k/v for a layer before it waits for the other's answer of that layer, so the attention worker
attends one while the dense rank computes the other; with one micro-batch every layer waits
for its own answer. Each side's busy time is in the step reports, and greedy tokens equal the
single-process float32 engine either way. Asserted on the order of events, not on timing."""

import pytest

from fapool import LLM, SamplingParams
from fapool.models.llama import Pending
from fapool.worker.pool_link import PoolAttend
from tiny_models import random_prompts

LENGTHS = [3, 10, 25, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12)
KW = dict(device="cpu", block_size=4, num_kv_blocks=64, worker_timeout_s=20.0)


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"][0], **KW)
    return [o.token_ids for o in llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)]


def _record_exchanges(monkeypatch) -> list[tuple[str, int, int, int]]:
    """(event, layer, micro-batch, count) on the driver: "post" when a micro-batch's q/k/v go to
    the pool, "wait" when the forward needs the answer."""
    events = []
    call = PoolAttend.__call__

    def logged(self, layer, q, k, v, kv_cache):
        events.append(("post", layer, self.index, self.count))
        pending = call(self, layer, q, k, v, kv_cache)

        def finish():
            events.append(("wait", layer, self.index, self.count))
            return pending.result()

        return Pending(finish=finish)

    monkeypatch.setattr(PoolAttend, "__call__", logged)
    return events


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_lamina_ping_pong_order_and_both_sides_busy(tiny_checkpoints, reference, monkeypatch, micro_batches):
    events = _record_exchanges(monkeypatch)
    kw = dict(KW, attention_workers=1, pool_threshold=0, micro_batches=micro_batches)
    with LLM(tiny_checkpoints["llama"][0], **kw) as llm:
        outs = llm.generate(_ids(random_prompts(LENGTHS, seed=21)), PARAMS)
        reports = list(llm.engine.executor.reports)
        num_layers = llm.engine.config.model.num_hidden_layers
    assert [o.token_ids for o in outs] == reference
    steps = [s for s in reports if s.num_micro_batches == micro_batches]
    assert steps
    for s in steps:  # both sides' busy time is recorded for every step
        assert s.ranks[0].compute_s > 0 and s.workers[1].compute_s > 0
        assert s.overlap is not None
    for count in {c for *_, c in events}:
        assert count == micro_batches or micro_batches == 2 and count == 1  # a step of one request
    pos = {}
    for k, (event, layer, index, count) in enumerate(events):
        if count == micro_batches:
            pos.setdefault((event, layer, index), []).append(k)
    for layer in range(num_layers):
        for post, wait in zip(pos[("post", layer, 0)], pos[("wait", layer, 0)]):
            if micro_batches == 2:
                # The other micro-batch's q/k/v of this layer left while micro-batch 0's attention
                # was still on the worker: the dense rank computed beside the worker.
                assert any(post < p < wait for p in pos[("post", layer, 1)])
            else:
                assert events[post + 1][:3] == ("wait", layer, 0)  # nothing between post and wait
