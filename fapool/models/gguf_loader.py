"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized to float32 under
Hugging Face parameter names, laid out exactly as transformers loads them."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fapool.config import ConfigError, ModelConfig, RopeScaling

GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp files Mistral under "llama"
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored by llama.cpp as per-frequency divisors
_MISSING = object()


def open_gguf(path: str) -> tuple[Any, ModelConfig]:
    """The file's reader and its model config. Parsing the metadata (a vocabulary of ~50K
    strings) takes seconds, so the last file read is kept until `release_gguf_readers`: the
    config and the weights of one start share one parse. The parsed metadata is dropped once
    the config holds what it needs (~90 MB of Python objects for the embedded model)."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)  # _read_gguf raises a ConfigError for it, and errors are not cached
    return _cached_file(os.path.abspath(path), *stamp)


@functools.lru_cache(maxsize=1)
def _cached_file(path: str, mtime_ns: int, size: int) -> tuple[Any, ModelConfig]:
    reader = _read_gguf(path)
    config = _config_of(reader, path)
    reader.fields.clear()  # the tensors keep their own index (reader.tensors)
    return reader, config


def release_gguf_readers() -> None:
    _cached_file.cache_clear()


def _read_gguf(path: str) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    # A bad magic or version is a ValueError; a truncated file fails while the reader maps its
    # header (IndexError) or its tensors (ValueError: the data is shorter than the shape).
    except (ValueError, OSError, IndexError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ConfigError(
            f"cannot read GGUF file {path} ({size} bytes; truncated or corrupt? re-download it): {e}"
        ) from None


def gguf_model_config(path: str) -> ModelConfig:
    return open_gguf(path)[1]


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, float32 tensor). A tied lm_head (no output.weight) is not yielded.
    The file is opened and checked at the call, before the first tensor is asked for."""
    reader, config = open_gguf(path)
    # Check every tensor before yielding any, so a bad file fails before a partial load.
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ConfigError(
                f"{path}: tensor {t.name} has unsupported GGUF type {t.tensor_type.name}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        if t.name != ROPE_FREQS:
            try:
                hf_name(t.name)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return _iter_tensors(reader, config)


def _iter_tensors(reader: Any, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import dequantize

    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if not data.flags.writeable:  # an F32 tensor comes back as a view of the mapped file
            data = data.copy()
        tensor = torch.from_numpy(data)
        if config.architecture == "llama":
            tensor = _unpermute_llama(name, tensor, config)
        yield name, tensor


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ConfigError(f"unexpected GGUF tensor {gguf_name!r} (not a llama/qwen2 parameter)")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation. Its converter reorders each head's rows from HF's
    rotate-half layout (pairs i, i + d/2) to adjacent pairs (2i, 2i+1); this is the inverse,
    the same as transformers' LlamaTensorProcessor. Works for weights [out, in] and biases [out]."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_llama(name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if ".self_attn.q_proj." in name:
        return unpermute_rotary(w, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rotary(w, config.num_key_value_heads)
    return w


def _config_of(reader: Any, path: str) -> ModelConfig:
    try:
        return _config(reader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # metadata of the wrong type
        raise ConfigError(f"{path}: bad GGUF metadata: {e}") from None


def _config(reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ConfigError(f"unsupported architecture {arch!r}; supported GGUF: {supported}")

    def key(suffix: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{suffix}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ConfigError(f"partial rotary embeddings (rope.dimension_count {rotary_dim} != {head_dim})")
    rope_theta = float(key("rope.freq_base", 10000.0))

    if ROPE_FREQS in tensors:
        factors = torch.from_numpy(np.array(tensors[ROPE_FREQS].data, dtype=np.float32).reshape(-1))
        original = int(key("rope.scaling.original_context_length", 8192))
        rope_scaling = llama3_scaling_from_factors(factors, head_dim, rope_theta, original)
    else:
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type != "none":
            raise ConfigError(f"unsupported GGUF rope scaling {scaling_type!r}")
        rope_scaling = None

    vocab = key("vocab_size", None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    if vocab is None:
        vocab = _array_len(reader, "tokenizer.ggml.tokens")

    eos: list[int] = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):  # all end a turn
        token = _field(reader, f"tokenizer.ggml.{name}", None)
        if token is not None and int(token) not in eos:
            eos.append(int(token))
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        hidden_act="silu",
        gated_mlp=True,
        # Qwen2 always has q/k/v bias; a llama-arch file has it exactly when the tensors exist.
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """What llama.cpp's converter stores as rope_freqs.weight for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (old_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def llama3_scaling_from_factors(
    factors: torch.Tensor, head_dim: int, theta: float, original: int
) -> RopeScaling | None:
    """GGUF keeps only the resulting factors, not llama3's parameters. Every Llama 3.x uses
    low_freq_factor 1 and high_freq_factor 4; take factor from the largest divisor and accept
    the guess only if it reproduces the stored factors."""
    if factors.numel() != head_dim // 2:
        raise ConfigError(f"{ROPE_FREQS} has {factors.numel()} entries, expected {head_dim // 2}")
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    guess = RopeScaling(
        rope_type="llama3",
        factor=float(factors.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=original,
    )
    if not torch.allclose(llama3_rope_factors(head_dim, theta, guess), factors, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{ROPE_FREQS} does not match llama3 rope scaling; cannot recover its parameters")
    return guess


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """One scalar or string metadata value (transformers' read_field, minus arrays)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ConfigError(f"GGUF metadata is missing {key}")
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if part.dtype == np.float32:
        # Shortest decimal that round-trips float32: 1e-05, not 9.999999747378752e-06.
        return float(str(part[0]))
    return part.tolist()[0]


def _array_len(reader: Any, key: str) -> int:
    field = reader.fields.get(key)
    if field is None:
        raise ConfigError(f"GGUF metadata has neither vocab_size nor {key}")
    return len(field.data)
