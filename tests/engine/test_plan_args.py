"""`--plan FILE` / LLM(plan=...): the engine takes the topology `fapool plan --json` recommended."""

import json

import pytest

from fapool import LLM, SamplingParams
from fapool.config import ConfigError
from fapool.engine.arg_utils import EngineArgs
from tiny_models import random_prompts


def _plan(tmp_path, engine_args) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"recommended": 0, "engine_args": engine_args, "rows": []}))
    return str(path)


def test_engine_runs_the_planned_afd_topology(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["llama"][0]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 30], seed=2)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    kw = dict(device="cpu", block_size=4, num_kv_blocks=64)
    want = [o.token_ids for o in LLM(folder, **kw).generate(prompts, params)]
    plan = _plan(tmp_path, {"afd_attention_ranks": 2, "afd_ffn_ranks": 1})
    with LLM(folder, plan=plan, **kw) as llm:
        assert llm.engine.config.parallel.afd_attention_ranks == 2
        assert llm.engine.kv.pool.num_partitions == 2
        assert [o.token_ids for o in llm.generate(prompts, params)] == want


def test_plan_conflicts_and_bad_files_are_config_errors(tmp_path):
    plan = _plan(tmp_path, {"tensor_parallel_size": 2, "attention_workers": 4})
    assert EngineArgs(plan=plan, attention_workers=4).with_plan().tensor_parallel_size == 2  # agreeing: fine
    with pytest.raises(ConfigError, match="sets attention_workers=4, but attention_workers=2 was given"):
        EngineArgs(plan=plan, attention_workers=2).with_plan()
    with pytest.raises(ConfigError, match="not a `fapool plan --json` file"):
        EngineArgs(plan=str(tmp_path / "missing.json")).with_plan()
    with pytest.raises(ConfigError, match="unknown engine argument 'warp_drive'"):
        EngineArgs(plan=_plan(tmp_path, {"warp_drive": 9})).with_plan()
