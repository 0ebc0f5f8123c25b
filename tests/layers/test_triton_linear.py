"""The small-M Triton matmul (fapool.layers.triton_linear) against torch's linear.

Runs on a CUDA GPU, or on CPU through Triton's interpreter with TRITON_INTERPRET=1; skipped
elsewhere (CI has neither)."""

import pytest
import torch
from gpu_marks import needs_cuda, needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes through numpy, which has no bfloat16.
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


@needs_triton
@pytest.mark.parametrize(
    "m, n, k, cfg, bias",
    [
        (8, 256, 512, (64, 128, 1), False),  # one K pass, even tiles
        (5, 96, 320, (32, 64, 2), True),  # ragged N and K, two splits, bias added after the sum
        (16, 64, 1024, (32, 128, 4), True),
        (33, 40, 200, (16, 32, 3), False),  # M past 32: a 64-row tile
        (64, 128, 256, (64, 64, 1), True),
        (1, 128, 256, None, False),  # the default setting
    ],
)
def test_skinny_linear_matches_torch(m, n, k, cfg, bias):
    from fapool.layers.triton_linear import SkinnyConfig, skinny_linear

    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, DTYPE)
    b = torch.randn(n, generator=g).to(DEVICE, DTYPE) if bias else None
    config = SkinnyConfig(*cfg, num_warps=4, num_stages=2) if cfg else None
    got = skinny_linear(x, w, b, config)
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = 2**-7 if DTYPE == torch.bfloat16 else 1e-5  # one bf16 rounding of the output
    assert got.dtype == DTYPE and got.shape == (m, n)
    assert (got.float() - want).abs().max() <= tol * want.abs().max() + 1e-6


@needs_triton
def test_skinny_linear_refuses_what_it_cannot_take():
    from fapool.layers.triton_linear import MAX_ROWS, skinny_linear

    w = torch.randn(64, 128, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="skinny_linear wants"):
        skinny_linear(torch.randn(MAX_ROWS + 1, 128, device=DEVICE, dtype=DTYPE), w)
    with pytest.raises(ValueError, match="skinny_linear wants"):
        skinny_linear(torch.randn(4, 128, device=DEVICE, dtype=DTYPE), w.t().contiguous().t())


@needs_cuda
def test_fused_linear_takes_the_tuned_kernel_and_matches_cublas():
    """A linear of a tuned shape takes the Triton kernel for a few rows, cuBLAS for many."""
    from unittest import mock

    from fapool.layers import fused, triton_linear
    from fapool.layers.fused import fuse_model

    (_, n, k), _ = next((key, c) for key, c in triton_linear.TUNED.items() if key[0] == 16 and c)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to("cuda", torch.bfloat16)
    fuse_model(model)
    assert isinstance(model[0], fused.FusedLinear)
    for m, expect_calls in ((8, 1), (triton_linear.MAX_ROWS + 1, 0)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with mock.patch.object(fused, "skinny_linear", wraps=triton_linear.skinny_linear) as spy:
            got = model(x)
        assert spy.call_count == expect_calls, m
        want = torch.nn.functional.linear(x, model[0].weight)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize(
    "act, torch_act", [("gelu", "gelu"), ("tanh", "gelu_pytorch_tanh"), ("silu", "silu")]
)
@pytest.mark.parametrize("split", [1, 4])
def test_skinny_linear_activation_epilogue_matches_torch(act, torch_act, split):
    """The activation in the epilogue equals torch's on the linear's rounded output, with and
    without a split K (where the sum kernel applies it)."""
    from fapool.layers.activation import Activation
    from fapool.layers.triton_linear import SkinnyConfig, skinny_linear

    g = torch.Generator().manual_seed(split)
    x = torch.randn(8, 512, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(192, 512, generator=g) / 512**0.5).to(DEVICE, DTYPE)
    cfg = SkinnyConfig(64, 64, split, num_warps=4, num_stages=2)
    got = skinny_linear(x, w, None, cfg, act)
    want = Activation(torch_act)(skinny_linear(x, w, None, cfg))
    tol = 2**-7 if DTYPE == torch.bfloat16 else 1e-5
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max() + 1e-6
