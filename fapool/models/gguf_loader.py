"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized to float32 under
Hugging Face parameter names, laid out exactly as transformers loads them."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fapool.config import ConfigError, ModelConfig, RopeScaling

GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp files Mistral under "llama"
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml type id -> dtype

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


@dataclasses.dataclass(frozen=True)
class GgufFile:
    """A parsed GGUF file: its metadata (string arrays such as the vocabulary as their lengths)
    and tensor table, and the file mapped read-only; tensor bytes are read when asked for."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # GGUF name -> transformers' TensorInfo (shape in torch order)
    data_start: int
    blob: np.ndarray

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as stored (uint8, flat), copied out of the mapping."""
        info = self.tensors[name]
        start = self.data_start + info.offset
        return torch.from_numpy(np.array(self.blob[start : start + info.nbytes]))

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor as float32 in torch order."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.ggml_type in FLOAT_TYPES:
            values = raw.view(FLOAT_TYPES[info.ggml_type]).float()
        else:
            values = dequantize_blocks(raw, info.ggml_type)
        return values.reshape(info.shape)


def open_gguf(path: str) -> tuple[GgufFile, ModelConfig]:
    """The parsed file and its model config. The last file read is kept until
    `release_gguf_readers`, so the config and the weights of one start share one parse."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)  # _read_gguf raises a ConfigError for it, and errors are not cached
    return _cached_file(os.path.abspath(path), *stamp)


@functools.lru_cache(maxsize=1)
def _cached_file(path: str, mtime_ns: int, size: int) -> tuple[GgufFile, ModelConfig]:
    file = _read_gguf(path)
    return file, _config_of(file, path)


def release_gguf_readers() -> None:
    _cached_file.cache_clear()


def _read_gguf(path: str) -> GgufFile:
    """transformers' GGUF reader: the header in milliseconds (gguf-py's GGUFReader builds an
    object per vocabulary entry and takes seconds)."""
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        metadata, _ = read_gguf_metadata(path)
        header = GgufHeader.from_file(path)
    except ValueError as e:
        if "not supported" in str(e):  # a tensor type with no dequantizer; the message names the file
            raise ConfigError(str(e)) from None
        raise _unreadable(path, size, e) from None
    # A truncated header runs the reader off the end of the file (struct.error).
    except (OSError, IndexError, struct.error) as e:
        raise _unreadable(path, size, e) from None
    for info in header.tensors:
        if header.data_start + info.offset + info.nbytes > size:
            raise _unreadable(path, size, f"tensor {info.name} ends past the end of the file")
    tensors = {info.name: info for info in header.tensors}
    return GgufFile(path, metadata, tensors, header.data_start, np.memmap(path, mode="r", dtype=np.uint8))


def _unreadable(path: str, size: int, cause: object) -> ConfigError:
    return ConfigError(f"cannot read GGUF file {path} ({size} bytes; truncated or corrupt? re-download it): {cause}")


def dequantize_blocks(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Flat GGUF blocks -> flat float32 values, by gguf-py (numpy; on a CPU faster than
    transformers' torch dequantizers for Q4_0 / Q4_1, the embedded model's types)."""
    from gguf import GGMLQuantizationType, dequantize

    values = dequantize(raw.numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1)


def gguf_model_config(path: str) -> ModelConfig:
    return open_gguf(path)[1]


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, float32 tensor). A tied lm_head (no output.weight) is not yielded.
    The file is opened and checked at the call, before the first tensor is asked for."""
    file, config = open_gguf(path)
    # Check every name before yielding any, so a bad file fails before a partial load.
    for name in file.tensors:
        if name != ROPE_FREQS:
            try:
                hf_name(name)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return _iter_tensors(file, config)


def _iter_tensors(file: GgufFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for gguf_name in file.tensors:
        if gguf_name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(gguf_name)
        tensor = file.tensor(gguf_name)
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


def _config_of(file: GgufFile, path: str) -> ModelConfig:
    try:
        return _config(file)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # metadata of the wrong type
        raise ConfigError(f"{path}: bad GGUF metadata: {e}") from None


def _config(file: GgufFile) -> ModelConfig:
    arch = _field(file, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ConfigError(f"unsupported architecture {arch!r}; supported GGUF: {supported}")

    def key(suffix: str, default: Any = _MISSING) -> Any:
        return _field(file, f"{arch}.{suffix}", default)

    tensors = file.tensors
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ConfigError(f"partial rotary embeddings (rope.dimension_count {rotary_dim} != {head_dim})")
    rope_theta = float(key("rope.freq_base", 10000.0))

    if ROPE_FREQS in tensors:
        factors = file.tensor(ROPE_FREQS).reshape(-1)
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
        vocab = _field(file, "tokenizer.ggml.tokens", None)  # a string array reads as its length
        if vocab is None:
            raise ConfigError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")

    eos: list[int] = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):  # all end a turn
        token = _field(file, f"tokenizer.ggml.{name}", None)
        if token is not None and int(token) not in eos:
            eos.append(int(token))
    bos = _field(file, "tokenizer.ggml.bos_token_id", None)
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


def _field(file: GgufFile, key: str, default: Any = _MISSING) -> Any:
    """One metadata value."""
    value = file.metadata.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ConfigError(f"GGUF metadata is missing {key}")
        return default
    if isinstance(value, float) and float(np.float32(value)) == value:
        # Stored as float32: its shortest decimal that round-trips, 1e-05 not 9.999999747378752e-06.
        return float(str(np.float32(value)))
    return value
