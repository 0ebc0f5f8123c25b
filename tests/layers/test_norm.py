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


def test_rmsnorm_unit_rms():
    x = torch.randn(5, 64) * 10
    out = RMSNorm(64, eps=0.0)(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(5), rtol=1e-5, atol=1e-5)
