"""Greedy tokens equal Hugging Face transformers' generate, float32 on CPU."""

import os

import pytest
import torch

from fapool import LLM, SamplingParams
from tiny_models import ARCHS, hf_greedy, random_prompts

NEW_TOKENS = 24
LENGTHS = [1, 2, 15, 16, 17, 63, 150, 300]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_match_transformers(tiny_checkpoints, arch):
    folder, hf_model = tiny_checkpoints[arch]
    prompts = random_prompts(LENGTHS, seed=len(arch))
    # A small token budget forces chunked prefill of the long prompts alongside decodes.
    llm = LLM(folder, device="cpu", block_size=16, max_num_batched_tokens=128, num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"


SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
]


def test_smollm2_gguf_matches_transformers(smollm2_llm):
    from transformers import AutoModelForCausalLM

    from fapool.models.loader import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    tok = smollm2_llm.tokenizer
    convs = [[{"role": "user", "content": p}] for p in SMOL_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    outs = smollm2_llm.chat(convs, params)
    for conv, out in zip(convs, outs):
        ids = out.prompt_token_ids
        assert ids == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert out.token_ids == hf_greedy(hf, ids, 32)
    assert "Paris" in outs[0].text


def test_prompt_logprobs_equal_transformers_log_softmax(tiny_checkpoints):
    """Each prompt token's logprob and its top alternatives equal log_softmax of transformers'
    logits over the whole prompt, with the prompt prefilled in chunks and a second request that
    shares a cached prefix (prompt_logprobs computes it anyway)."""
    folder, hf_model = tiny_checkpoints["llama"]
    llm = LLM(folder, device="cpu", block_size=4, max_num_batched_tokens=16, num_kv_blocks=256)
    prompt = random_prompts([45], seed=12)[0]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1))  # caches the prefix
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    assert out.metrics.num_cached_tokens == 0
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        chosen, *top = out.prompt_logprobs[p]
        assert chosen.token_id == prompt[p]
        assert chosen.logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4)
        values, ids = ref[p - 1].topk(3)
        assert [t.token_id for t in top] == ids.tolist()
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
