"""Tiny random Hugging Face checkpoints for tests, built with transformers itself."""

from __future__ import annotations

import math
import os

import torch

ARCHS = ("llama", "qwen2", "mistral")


def hf_config(arch: str):
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        # No EOS: every greedy run is exactly max_tokens long, so all tokens are compared.
        eos_token_id=None,
        bos_token_id=1,
        pad_token_id=0,
    )
    if arch == "llama":  # GQA with llama3 rope scaling
        return transformers.LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":  # qkv bias, tied embeddings
        return transformers.Qwen2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        )
    if arch == "mistral":  # MHA
        return transformers.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)
    raise ValueError(arch)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than the default init so logits are peaked: greedy parity then tests the
    computation, not the tie-breaking of near-equal logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]) * 1.5)


def make_checkpoint(folder: str, arch: str, seed: int = 0, num_hidden_layers: int | None = None):
    """Save a tiny random model of `arch` to `folder` (config.json + model.safetensors) and
    return the transformers model, in float32 eval mode. num_hidden_layers: instead of 2."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(arch)
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    randomize(model, seed)
    model.eval()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy generate: up to new_tokens, ending early at the model's EOS (the
    EOS token included, as fapool reports it)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def add_byte_tokenizer(folder: str) -> None:
    """A byte-level tokenizer whose 256 ids are the tiny models' vocabulary, with a plain-text
    chat template, so text prompts and chat run on a model that takes milliseconds a step."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
