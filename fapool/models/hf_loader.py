"""Hugging Face checkpoint folders: config.json -> ModelConfig, and *.safetensors (or a
plain pytorch_model.bin) streamed as (name, float32 tensor) pairs.

The same parser reads fapool's own config.json for presets ("seed-gelu"), whose keys are
ModelConfig's field names; those coincide with Hugging Face's names except eos_token_ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from fapool.config import ConfigError, ModelConfig, RopeScaling

HF_ARCHITECTURES = ("llama", "mistral", "qwen2")
NATIVE_ARCHITECTURE = "seed-gelu"

# Hugging Face's class defaults, used only when an (older, hand-written) config.json omits a key.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, NATIVE_ARCHITECTURE: 4096}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"


def read_config_json(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {folder}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"malformed config.json at {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"malformed config.json at {path}: expected a JSON object")
    return raw


def hf_model_config(folder: str) -> ModelConfig:
    raw = read_config_json(folder)
    # generation_config.json often lists more stop tokens (Llama 3 instruct: end of turn).
    extra_eos = _generation_eos(folder)
    path = os.path.join(folder, "config.json")
    try:
        return config_from_dict(raw, extra_eos)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. "rms_norm_eps": null
        raise ConfigError(f"{path}: bad value: {e}") from None


def config_from_dict(raw: dict[str, Any], extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError("config has no model_type")
    if model_type not in HF_ARCHITECTURES and model_type != NATIVE_ARCHITECTURE:
        raise ConfigError(
            f"unsupported architecture {model_type!r}; supported: "
            f"{', '.join(HF_ARCHITECTURES + (NATIVE_ARCHITECTURE,))}"
        )
    if raw.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is unsupported (no bias on MLP projections)")
    native = model_type == NATIVE_ARCHITECTURE

    hidden = _require(raw, "hidden_size")
    num_heads = _require(raw, "num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ConfigError(f"hidden_size and num_attention_heads must be ints, got {hidden!r}, {num_heads!r}")
    rope_theta, rope_scaling = _rope(raw)

    sliding_window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        sliding_window = None  # qwen2 records a window but only applies it with use_sliding_window

    eos = _as_ids(raw.get("eos_token_ids", raw.get("eos_token_id")))
    eos += tuple(i for i in extra_eos if i not in eos)
    return ModelConfig(
        architecture=model_type,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size"),
        num_hidden_layers=_require(raw, "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or hidden // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type],
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        hidden_act=raw.get("hidden_act", "gelu" if native else "silu"),
        gated_mlp=bool(raw.get("gated_mlp", False)) if native else True,
        # Qwen2 always has q/k/v bias, and its config.json carries no flag for it.
        attention_bias=True if model_type == "qwen2" else bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        sliding_window=sliding_window,
    )


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """fapool's config.json form of a ModelConfig; config_from_dict reads it back."""
    out: dict[str, Any] = {"model_type": config.architecture}
    for f in dataclasses.fields(config):
        if f.name != "architecture":
            out[f.name] = getattr(config, f.name)
    out["rope_scaling"] = dataclasses.asdict(config.rope_scaling) if config.rope_scaling else None
    out["eos_token_ids"] = list(config.eos_token_ids)
    return out


def save_model_config(config: ModelConfig, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(model_config_to_dict(config), f, indent=2, sort_keys=True)
    return path


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ConfigError(f"config is missing {key}")
    return raw[key]


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ConfigError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either transformers-5 `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling` (whose type key is `rope_type` or `type`)."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"unsupported rope_parameters {params!r} (per-layer-type rope)")
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial rotary embeddings (partial_rotary_factor != 1) are unsupported")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in scaling.items() if k in known and k != "rope_type"}
    # ModelConfig.validate rejects rope types other than llama3 with the list of supported ones.
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def _generation_eos(folder: str) -> tuple[int, ...]:
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return _as_ids(raw.get("eos_token_id"))
    except (OSError, json.JSONDecodeError, AttributeError, ConfigError):
        return ()  # optional file: a bad one must not block loading


def weight_files(folder: str) -> list[str]:
    """Checkpoint files in load order; raises FileNotFoundError naming what was looked for."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"malformed {index_path}: {e}") from None
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{index_path} names missing shards: {', '.join(missing)}")
        return files
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return [single]
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if shards:
        return [os.path.join(folder, n) for n in shards]
    binary = os.path.join(folder, BIN_SINGLE)
    if os.path.isfile(binary):
        return [binary]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} with shards, "
        f"*.safetensors or {BIN_SINGLE}"
    )


def iter_hf_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields checkpoint tensors one at a time (float32, CPU). A tied lm_head is absent from
    the checkpoint and so from this stream; the caller ties it."""
    files = weight_files(folder)  # outside the generator: a missing file fails at the call
    return _iter_files(files)


def _iter_files(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        if path.endswith(".bin"):
            yield from _iter_bin(path)
            continue
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if not _skip(name):
                    yield name, f.get_tensor(name).to(torch.float32)


def _iter_bin(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickles with custom classes fail here; we load nothing else
        raise ConfigError(f"cannot load {path} with weights_only=True: {e}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{path}: entry {name!r} is not a tensor")
        if not _skip(name):
            yield name, tensor.to(torch.float32)


def _skip(name: str) -> bool:
    # Older Llama checkpoints store the rotary inverse frequencies; they are recomputed from config.
    return name.endswith("rotary_emb.inv_freq")
