"""Rotary position embeddings (non-interleaved, Hugging Face's rotate_half convention).

The cos/sin table is computed once per model, on the CPU in float32, for every position up
to max_position_embeddings, then looked up by each token's position. Computing it the way
transformers does (same inv_freq formula, float32 product, cos/sin) keeps the values equal
to transformers', so greedy tokens match.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fapool.config import RopeScaling


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, llama3 scaling applied when asked for."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_scaling is None or rope_scaling.rope_type == "default":
        return inv_freq
    if rope_scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_scaling.rope_type!r}")
    return _llama3_scale(inv_freq, rope_scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling, step for step as transformers'
    `_compute_llama3_parameters`: wavelengths shorter than old_len / high_freq_factor are
    kept, longer than old_len / low_freq_factor are divided by `factor`, and the band in
    between is interpolated smoothly."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Owns the table; `forward(positions)` returns (cos, sin), each [T, head_dim // 2],
    which `apply_rotary` applies to q and k of every layer."""

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int,
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)
        positions = torch.arange(max_position_embeddings, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, D]: cos | sin
        # Not persistent: never in a state dict, rebuilt from the config. A later
        # `model.to(dtype)` rounds it to that dtype, which is what HF does to cos/sin too.
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        return cos_sin.chunk(2, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D/2]. Equals HF's `x * cos + rotate_half(x) * sin` with the
    duplicated [cos, cos] table, computed in x's dtype as HF does."""
    cos = cos.to(x.dtype).unsqueeze(-2)
    sin = sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
