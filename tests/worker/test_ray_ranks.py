"""The ranks of a multi-rank engine as Ray actors (distributed_executor "ray", CPU, a local Ray):
AFD's attention and FFN ranks and pipeline stages run launcher.rank_main in actors that join
one gloo group at start; greedy tokens equal the single-process float32 engine; a killed actor
is named like a dead process; what Ray cannot run is a ConfigError naming the option."""

import pytest

from fapool import LLM, SamplingParams
from fapool.config import ConfigError
from fapool.worker import comm
from fapool.worker.comm import WorkerFailure
from fapool.worker.ray_ranks import RayRank
from tiny_models import random_prompts

LENGTHS = [3, 10, 25, 40, 70]
PARAMS = SamplingParams(temperature=0.0, max_tokens=30)
PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=21)]

pytestmark = pytest.mark.usefixtures("local_ray")


def _kw(**kw):
    return dict(device="cpu", block_size=4, num_kv_blocks=64, worker_timeout_s=20.0, **kw)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    return [o.token_ids for o in LLM(tiny_checkpoints["llama"][0], **_kw()).generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize(
    "topology",
    [
        dict(afd_attention_ranks=2, afd_ffn_ranks=1, micro_batches=2),  # the r=2, f=1
        dict(afd_attention_ranks=1, afd_ffn_ranks=2, micro_batches=2),  # r=1, f=2: the FFN tensor parallel
        dict(pipeline_parallel_size=2),
    ],
)
def test_ray_ranks_match_single_process(tiny_checkpoints, reference, topology):
    with LLM(tiny_checkpoints["llama"][0], distributed_executor="ray", **_kw(**topology)) as llm:
        runner = llm.engine.executor.runner
        procs = runner.workers.procs
        # Every rank but the driver is a Ray actor, in one gloo group with the driver (over this
        # host's sockets: the actors run here), not a spawned process.
        world = runner.topology.world_size
        assert sorted(procs) == list(range(1, world)) and all(isinstance(p, RayRank) for p in procs.values())
        assert all(p.is_alive() for p in procs.values())
        assert comm.transport_name() == "unix"
        outs = llm.generate(PROMPTS, PARAMS)
        reports = llm.engine.executor.reports
    assert [o.token_ids for o in outs] == reference
    for rank in range(world):  # every rank worked
        assert sum(s.ranks[rank].compute_s for s in reports) > 0, rank
    # Shut down: each rank stopped cleanly when told to.
    assert [p.exitcode for p in procs.values()] == [0] * (world - 1)


def test_killed_ray_rank_is_named(tiny_checkpoints):
    with LLM(tiny_checkpoints["llama"][0], distributed_executor="ray", **_kw(afd_attention_ranks=2, afd_ffn_ranks=1)) as llm:
        engine = llm.engine
        procs = engine.executor.runner.workers.procs
        for p in PROMPTS:
            engine.add_request(p["prompt_token_ids"], PARAMS)
        for _ in range(3):
            engine.step()
        procs[2].kill()
        with pytest.raises(WorkerFailure) as info:
            while engine.has_unfinished_requests():
                engine.step()
    err = info.value
    assert err.rank == 2 and "AFD FFN rank 2" in str(err) and "exited" in str(err)


@pytest.mark.parametrize(
    "kw,match",
    [
        # AFD with the attention pool is refused whatever the executor.
        (dict(attention_workers=1, afd_attention_ranks=1, afd_ffn_ranks=1), "attention_workers"),
        (dict(), "this configuration has one rank"),  # nothing for Ray to run
    ],
)
def test_ray_configurations_that_cannot_run(tiny_checkpoints, kw, match):
    with pytest.raises(ConfigError, match=match):
        LLM(tiny_checkpoints["llama"][0], device="cpu", distributed_executor="ray", **kw)


def test_engine_starts_and_stops_its_own_ray(tiny_checkpoints, reference):
    """Without a running Ray (the CLI's case) the engine starts a local one for its ranks and
    stops it on shutdown, its actors with it."""
    import ray

    ray.shutdown()  # the session's instance
    try:
        with LLM(tiny_checkpoints["llama"][0], distributed_executor="ray", **_kw(afd_attention_ranks=1, afd_ffn_ranks=1)) as llm:
            assert ray.is_initialized()
            assert [o.token_ids for o in llm.generate(PROMPTS[:2], PARAMS)] == reference[:2]
        assert not ray.is_initialized()
    finally:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
