"""cpu_fused.c against the torch code each kernel replaces: the residual add exact, RMSNorm
within float32 summation order, rotary bit-equal to apply_rotary in bf16, SiLU-and-multiply
within one bf16 rounding; a quantized engine runs them."""

import pytest
import torch
import torch.nn.functional as F

from fapool.layers import cpu_fused
from fapool.layers.norm import RMSNorm, rms_norm
from fapool.layers.rotary import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(cpu_fused.load() is None, reason="needs a C compiler and a CPU with AVX512-BF16")


@pytest.mark.parametrize("rows, hidden", [(1, 576), (16, 576), (300, 72)])
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(rows, hidden, delta_dtype):
    torch.manual_seed(rows + hidden)
    x, w = torch.randn(rows, hidden) * 3, torch.rand(hidden) + 0.5
    delta = None if delta_dtype is None else torch.randn(rows, hidden).to(delta_dtype)
    s, y = cpu_fused.add_rms_norm(x, delta, w, 1e-5)
    want_s = x if delta is None else x + delta
    assert torch.equal(s, want_s)
    torch.testing.assert_close(y, rms_norm(want_s, w, 1e-5), rtol=3e-6, atol=1e-6)
    assert delta is None or not torch.equal(x, s)  # the caller's x is left as it was


@pytest.mark.parametrize("head_dim", [64, 24])
def test_rotary_is_bit_equal_to_apply_rotary_in_bf16(head_dim):
    torch.manual_seed(head_dim)
    tokens, nq, nk, nv = 37, 6, 2, 2
    qkv = torch.randn(tokens, (nq + nk + nv) * head_dim).bfloat16()  # q and k: a strided view of it
    x = qkv[:, : (nq + nk) * head_dim].view(tokens, nq + nk, head_dim)
    cos, sin = RotaryEmbedding(head_dim, 4096, 10000.0)(torch.randint(0, 4000, (tokens,)))
    got = cpu_fused.rotary(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, apply_rotary(x, cos, sin))


def test_silu_mul_within_one_bf16_rounding():
    torch.manual_seed(0)
    gate_up = (torch.randn(19, 2 * 200) * 4).bfloat16()
    got = cpu_fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    exact = F.silu(gate.double()) * up.double()
    ulp = exact.abs().clamp_min(1e-30).log2().floor().exp2() * 2.0**-7
    assert ((got.double() - exact).abs() <= 2 * ulp + 1e-30).all()
    assert (got == want).float().mean() > 0.99


def test_fused_norm_falls_back_off_its_dtypes():
    norm = RMSNorm(64)
    cpu_fused.fuse_cpu_model(norm)
    assert type(norm) is cpu_fused.CpuFusedRMSNorm
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, norm.eps))
