"""Architecture name -> model class, and construction on a device in a dtype."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fapool.attention.backend import AttentionBackend
from fapool.config import ModelConfig
from fapool.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "seed-gelu": LlamaForCausalLM,
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _no_parameter_init():
    """Linear and Embedding parameters left as allocated: the loader or init_random_weights
    writes every one, and the default init (random numbers for every weight) costs as much as
    loading a small model."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(
    config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device | str
) -> LlamaForCausalLM:
    """An uninitialized model (load_weights or init_random_weights next), its parameters
    created directly on `device` in `dtype` so a large model never exists in float32."""
    try:
        cls = MODEL_CLASSES[config.architecture]
    except KeyError:
        raise ValueError(
            f"no model class for architecture {config.architecture!r}; known: {', '.join(MODEL_CLASSES)}"
        ) from None
    with torch.device(device), _default_dtype(dtype), _no_parameter_init():
        model = cls(config, backend)
    return model.eval()
