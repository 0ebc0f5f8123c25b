"""cpu_stack.c: a quantized model's decode steps in one C call give the same bits as the layer
loop with the same kernels (tokens and logprobs equal), and the stack is attached only where
every layer is one the kernels take."""

import pytest
from tiny_models import make_checkpoint, random_prompts

from fapool import LLM, SamplingParams
from fapool.layers import cpu_stack
from fapool.layers.cpu_stack import DecodeStack

pytestmark = pytest.mark.skipif(cpu_stack.load() is None, reason="needs a C compiler and a CPU with AVX512-BF16")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for i, arch in enumerate(("llama", "qwen2")):
        folders[arch] = str(tmp_path_factory.mktemp(arch))
        make_checkpoint(folders[arch], arch, seed=20 + i)
    return folders


def _model(llm: LLM):
    return llm.engine.executor.runner.model


def _run(llm: LLM, prompts, max_tokens: int):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [(o.outputs[0].token_ids, [[(e.token_id, e.logprob) for e in row] for row in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("lengths", [[5, 40, 90, 17], [600]], ids=["batch", "one-long-split"])
def test_stack_equals_the_layer_loop(checkpoints, monkeypatch, lengths):
    calls = []
    real_call = DecodeStack.__call__
    monkeypatch.setattr(DecodeStack, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    prompts = random_prompts(lengths, seed=5)
    with LLM(checkpoints["llama"], device="cpu", quantization="int4", num_kv_blocks=128,
             enable_prefix_caching=False) as llm:
        stack = _model(llm).model.decode_stack
        assert isinstance(stack, DecodeStack)
        got = _run(llm, prompts, 20)
        assert len(calls) >= 19  # every decode step went through the stack
        _model(llm).model.decode_stack = None
        calls.clear()
        ref = _run(llm, prompts, 20)
        assert not calls
    assert got == ref


def test_stack_only_where_every_layer_fits(checkpoints):
    with LLM(checkpoints["qwen2"], device="cpu", quantization="int4", num_kv_blocks=64) as llm:
        assert _model(llm).model.decode_stack is None  # qkv bias: the loop adds it
    with LLM(checkpoints["llama"], device="cpu", num_kv_blocks=64) as llm:
        assert _model(llm).model.decode_stack is None  # float32: HF's exact path
    with LLM(checkpoints["llama"], device="cpu", quantization="int8", num_kv_blocks=64) as llm:
        assert _model(llm).model.decode_stack is None  # aten's int8 kernel


def test_steps_the_stack_does_not_take_run_the_loop(checkpoints, monkeypatch):
    """Prefill chunks and batches mixing prefill with decode go through the layer loop."""
    seen = []  # (the step's longest query, whether the stack took it)
    real_runs = DecodeStack.runs

    def runs(self, meta, kv_caches):
        seen.append((meta.max_query_len, real_runs(self, meta, kv_caches)))
        return seen[-1][1]

    monkeypatch.setattr(DecodeStack, "runs", runs)
    with LLM(checkpoints["llama"], device="cpu", quantization="int4", num_kv_blocks=64, max_num_batched_tokens=64,
             enable_prefix_caching=False) as llm:
        llm.generate([{"prompt_token_ids": p} for p in random_prompts([30, 100], seed=6)],
                     SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(not ran for q, ran in seen if q > 1) and any(ran for _q, ran in seen)
