"""cpu_int4.c: the int4 matmul equals the float64 product of its bf16 input and dequantized
weight, rounded once to bf16 (but for rare double-rounding ties); the packing holds every q."""

import pytest
import torch

from fapool.layers import cpu_int4
from fapool.layers.cpu_quant import dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(cpu_int4.load() is None, reason="needs a C compiler and a CPU with AVX512-BF16")


def _unpack(p: cpu_int4.PackedInt4) -> torch.Tensor:
    """The inverse of cpu_int4.pack's byte layout, in plain torch."""
    tiles, groups = p.out_features // 16, p.in_features // 32
    b = p.data.view(tiles, groups, 8, 16, 2)  # [tile, group, p, c, h]
    halves = torch.stack([b & 15, b >> 4], dim=-1)  # [tile, group, p, c, h, half]
    return halves.permute(0, 3, 1, 5, 2, 4).reshape(p.out_features, p.in_features)


def test_pack_holds_every_nibble():
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    scale, offset = torch.rand(48, 3), torch.randn(48, 3)
    p = cpu_int4.pack(q, scale, offset)
    assert torch.equal(_unpack(p), q)
    assert torch.equal(p.scale[1, 2], scale[16:32, 2]) and torch.equal(p.offset[2, 0], offset[32:48, 0])


@pytest.mark.parametrize("n, k", [(960, 576), (48, 1536), (16, 32)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 64, 70])
def test_matmul_equals_the_rounded_exact_product(n, k, m):
    torch.manual_seed(n + k + m)
    q, scale, offset = quantize_int4(torch.randn(n, k))
    x = torch.randn(m, k).bfloat16()
    got = cpu_int4.matmul(cpu_int4.load(), x, cpu_int4.pack(q, scale, offset))
    w = dequantize_int4(q, scale, offset).double()
    exact = x.double() @ w.T
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # float32 sums of exact products, rounded once to bf16: within a bf16 ulp of the exact value,
    # plus float32 rounding of the sum where its terms cancel.
    ulp = exact.abs().clamp_min(1e-30).log2().floor().exp2() * 2.0**-7
    cancellation = 2.0**-16 * (x.double().abs() @ w.abs().T)
    assert ((got.double() - exact).abs() <= ulp + cancellation).all()
    assert (got == exact.bfloat16()).float().mean() > 0.97


def test_float32_input_is_rounded_to_bf16_in_the_kernel():
    torch.manual_seed(5)
    p = cpu_int4.pack(*quantize_int4(torch.randn(64, 96)))
    x = torch.randn(5, 96)
    assert torch.equal(cpu_int4.matmul(cpu_int4.load(), x, p), cpu_int4.matmul(cpu_int4.load(), x.bfloat16(), p))


def test_sizes_it_was_not_built_for_are_refused():
    with pytest.raises(ValueError, match="out features a multiple of 16"):
        cpu_int4.pack(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(40, 2), torch.zeros(40, 2))
