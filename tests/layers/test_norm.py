"""RMSNorm equals transformers' LlamaRMSNorm bit for bit, including in bfloat16."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fapool.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_matches_transformers(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = 96
    weight = 1 + 0.1 * torch.randn(hidden, generator=g)
    x = (3 * torch.randn(7, hidden, generator=g)).to(dtype)

    ours = RMSNorm(hidden, eps=1e-5).to(dtype)
    ref = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_float32_cpu_rmsnorm_is_transformers_bit_for_bit_at_every_scale(hidden, rows):
    """float32 on the CPU goes through aten's fused kernel: still LlamaRMSNorm's bits."""
    g = torch.Generator().manual_seed(hidden + rows)
    ours, ref = RMSNorm(hidden, eps=1e-6), LlamaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        weight = torch.randn(hidden, generator=g)
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
        for scale in (1e-3, 1.0, 1e3):
            x = scale * torch.randn(rows, hidden, generator=g)
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_rmsnorm_unit_rms():
    x = torch.randn(5, 64) * 10
    out = RMSNorm(64, eps=0.0)(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(5), rtol=1e-5, atol=1e-5)
