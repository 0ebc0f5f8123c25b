"""Rotary tables and their application against transformers' Llama implementation."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fapool.config import RopeScaling
from fapool.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def _hf_config(head_dim, theta, rope_scaling, max_pos=512):
    params = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling is not None:
        params = {"rope_type": "llama3", "rope_theta": theta, **rope_scaling}
    return LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )


@pytest.mark.parametrize(
    "theta,scaling",
    [
        (500000.0, LLAMA3),
        (10000.0, LLAMA3),
        (500000.0, dict(LLAMA3, original_max_position_embeddings=8192)),
        (10000.0, dict(LLAMA3, factor=32.0, original_max_position_embeddings=128)),
    ],
)
def test_llama3_inv_freq_matches_transformers(theta, scaling):
    head_dim = 128
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](_hf_config(head_dim, theta, scaling))
    ours = compute_inv_freq(head_dim, theta, RopeScaling(rope_type="llama3", **scaling))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # The scaling must actually change something in these cases (otherwise the test is vacuous).
    assert not torch.equal(ours, compute_inv_freq(head_dim, theta, None))


def test_default_inv_freq_matches_transformers():
    cfg = _hf_config(64, 10000.0, None)
    expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    torch.testing.assert_close(compute_inv_freq(64, 10000.0, None), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        compute_inv_freq(64, 10000.0, RopeScaling(rope_type="default")), expected, rtol=0, atol=0
    )


@pytest.mark.parametrize("scaling", [None, LLAMA3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_application_matches_transformers(scaling, dtype):
    head_dim, theta, max_pos = 32, 10000.0, 512
    hf_rope = LlamaRotaryEmbedding(_hf_config(head_dim, theta, scaling, max_pos))
    rope = RotaryEmbedding(
        head_dim, max_pos, theta, RopeScaling(rope_type="llama3", **scaling) if scaling else None
    )
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 511, 7])
    q = torch.randn(len(positions), 4, head_dim, generator=g).to(dtype)
    k = torch.randn(len(positions), 2, head_dim, generator=g).to(dtype)

    cos_hf, sin_hf = hf_rope(q, positions[None])  # [1, T, D] in q's dtype
    # HF: [batch, heads, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_hf, sin_hf)

    cos, sin = rope(positions)
    assert cos.shape == (len(positions), head_dim // 2)
    torch.testing.assert_close(torch.cat((cos, cos), -1).to(dtype), cos_hf[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1).to(dtype), sin_hf[0], rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf[0].transpose(0, 1), rtol=0, atol=0)


def test_rotary_cache_is_float32_on_default_device_and_not_in_state_dict():
    rope = RotaryEmbedding(16, 64)
    assert rope.cos_sin_cache.dtype == torch.float32
    assert rope.cos_sin_cache.shape == (64, 16)
    assert "cos_sin_cache" not in rope.state_dict()
    # position 0 is the identity rotation
    cos, sin = rope(torch.tensor([0]))
    assert torch.equal(cos, torch.ones(1, 8)) and torch.equal(sin, torch.zeros(1, 8))
