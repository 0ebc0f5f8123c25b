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
