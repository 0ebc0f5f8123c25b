"""Weight-only quantized CPU linears: close to the float linear, Q4_1 weights recovered exactly,
the LM head's top tokens rescored exactly, shapes the kernels cannot take refused."""

import pytest
import torch
from torch import nn

from fapool.config import ConfigError
from fapool.layers import cpu_int4
from fapool.layers.cpu_linear import bf16_supported
from fapool.layers.cpu_quant import (
    MAX_NATIVE_INT4_ROWS,
    MAX_QUANTIZED_ROWS,
    RESCORE_TOP_K,
    QuantizedHead,
    QuantizedLinear,
    QuantizedMergedLinear,
    dequantize_int4,
    quantize_int4,
    quantize_linears,
)
from fapool.layers.linear import MergedLinear


class _Tiny(nn.Module):
    def __init__(self, hidden: int = 64, vocab: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = MergedLinear(hidden, (64, 32, 32), ("q", "k", "v"), bias=True)
        self.down = nn.Linear(128, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _q4_1_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight on llama.cpp's Q4_1 grid: per 32 inputs, min + scale * q with q = 0 and 15 used."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, k // 32, 1, generator=g).half().float() * 0.01 + 1e-3
    low = -torch.rand(n, k // 32, 1, generator=g).half().float() * 0.05
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (scale * q + low).view(n, k)


def test_int4_recovers_q4_1_weights():
    w = _q4_1_weight(48, 96)
    q, scale, offset = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15
    torch.testing.assert_close(dequantize_int4(q, scale, offset), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme, bound", [("int8", 0.02), ("int4", 0.01)])
def test_quantized_linears_close_to_float(scheme, bound):
    """int8 per channel on Gaussian weights; int4 on Q4_1-grid weights (only bf16 rounding is
    left). Bounds on ||y - y_float|| / ||y_float||."""
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.down.weight.copy_(_q4_1_weight(64, 128) if scheme == "int4" else torch.randn(64, 128) / 11)
    x64, x128 = torch.randn(7, 64), torch.randn(3, 5, 128)
    want = (model.qkv(x64), model.down(x128))
    assert quantize_linears(model, scheme) == 3
    assert type(model.qkv) is QuantizedMergedLinear and type(model.down) is QuantizedLinear
    got = (model.qkv(x64), model.down(x128))
    # The kernel's bf16 stays (a float32 bias promotes it).
    assert got[1].shape == (3, 5, 64) and got[1].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    assert _relative_error(got[1].float(), want[1]) < bound
    # qkv keeps nn.Linear's uniform init, off any grid: int4's 16 levels per group cost more.
    assert _relative_error(got[0], want[0]) < (0.02 if scheme == "int8" else 0.1)
    assert [t.shape for t in model.qkv.split(got[0])] == [(7, 64), (7, 32), (7, 32)]
    assert model.qkv.weight.numel() == 0 and model.down.weight.numel() == 0  # dense copies dropped


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_head_rescores_its_top_tokens_exactly(scheme):
    torch.manual_seed(1)
    model = _Tiny()
    x = torch.randn(5, 64)
    want = model.lm_head(x)
    quantize_linears(model, scheme)
    assert type(model.lm_head) is QuantizedHead
    assert (
        model.lm_head.weight is model.embed.weight and model.embed.weight.numel() == 512 * 64
    )  # lookup exact
    got = model.lm_head(x)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # The quantized ranking's top k are recomputed exactly (a tail logit may outrank one of them).
    exact = (got - want).abs() <= 1e-5 * want.abs().clamp_min(1)
    assert exact.sum(-1).min() >= RESCORE_TOP_K
    assert _relative_error(got, want) < 0.02  # the tail: bf16 (or int8 per channel)


def test_int4_refuses_shapes_its_kernel_cannot_take():
    model = nn.Sequential(nn.Linear(40, 64))  # 40 inputs: not whole groups of 32
    with pytest.raises(ConfigError, match="quantization int4"):
        quantize_linears(model, "int4")
    assert type(model[0]) is nn.Linear  # checked before anything changed
    assert quantize_linears(model, "int8") == 1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_in_row_blocks_equals_the_whole_weight(scheme):
    """quantize_module works on cache-sized row blocks; the result is the whole weight's."""
    from fapool.layers.cpu_quant import _row_chunks, quantize_int8

    torch.manual_seed(2)
    linear = nn.Linear(576, 1040, bias=False)  # 192-row blocks: five full and an 80-row tail
    assert len(_row_chunks(linear.weight)) == 6
    w = linear.weight.detach().clone()
    x = torch.randn(5, 576)
    if scheme == "int8":
        q, scale = quantize_int8(w)
        want = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16())
    else:
        want = _int4_kernel(w, x)
    model = nn.Sequential(linear)
    quantize_linears(model, scheme)
    assert torch.equal(model[0](x), want)


def _int4_kernel(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ int4(w).T through the kernel quantize_linears picks here: cpu_int4.c where it runs, else aten's."""
    q, scale, offset = quantize_int4(w)
    if cpu_int4.load() is not None:
        return cpu_int4.matmul(cpu_int4.load(), x.bfloat16(), cpu_int4.pack(q, scale, offset))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).bfloat16().contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, scales)


@pytest.mark.skipif(not bf16_supported(), reason="needs a CPU with bf16 matmuls (AVX512-BF16 or AMX)")
def test_many_rows_go_through_the_bf16_copy():
    """A prefill's rows use the packed bf16 weight (the dequantized weight rounded to bf16); a
    decode batch's the int4 kernel (up to MAX_NATIVE_INT4_ROWS rows for cpu_int4.c, else
    MAX_QUANTIZED_ROWS for aten's)."""
    torch.manual_seed(3)
    linear = nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_q4_1_weight(128, 64))
    w = linear.weight.detach().clone()
    model = nn.Sequential(linear)
    quantize_linears(model, "int4")
    limit = MAX_NATIVE_INT4_ROWS if cpu_int4.load() is not None else MAX_QUANTIZED_ROWS
    assert model[0].max_quantized_rows == limit
    many, few = torch.randn(limit + 1, 64), torch.randn(limit, 64)
    want = torch.nn.functional.linear(many.bfloat16().float(), w.bfloat16().float())
    torch.testing.assert_close(model[0](many).float(), want, rtol=1e-2, atol=1e-3)
    assert torch.equal(model[0](few), _int4_kernel(w, few))
