"""CPU linears through oneDNN with packed weights: the same outputs as torch's linear, the
dense copy dropped, a tied LM head kept."""

import pytest
import torch
from torch import nn

from fapool.layers.cpu_linear import PackedLinear, PackedMergedLinear, bf16_supported, can_pack, pack_linears
from fapool.layers.linear import MergedLinear

pytestmark = pytest.mark.skipif(not can_pack(torch.float32), reason="torch built without oneDNN")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.qkv = MergedLinear(16, (16, 8, 8), ("q", "k", "v"), bias=True)
        self.down = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_packed_linears_equal_torch_and_drop_the_dense_weight():
    torch.manual_seed(0)
    model = _Tiny()
    x16, x32 = torch.randn(7, 16), torch.randn(3, 5, 32)
    want = (model.qkv(x16), model.down(x32), model.head(x16))
    assert pack_linears(model) == 3
    assert type(model.qkv) is PackedMergedLinear and type(model.down) is PackedLinear
    got = (model.qkv(x16), model.down(x32), model.head(x16))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert [t.shape for t in model.qkv.split(got[0])] == [(7, 16), (7, 8), (7, 8)]
    assert model.qkv.weight.numel() == 0 and model.down.weight.numel() == 0
    assert model.head.weight is model.embed.weight and model.embed.weight.numel() == 50 * 16
    for rows in (1, 8, 64):  # one packed layout serves every row count
        torch.testing.assert_close(model.head(x16[:1].expand(rows, 16)), want[2][:1].expand(rows, 50))


def test_bf16_packs_where_the_cpu_has_bf16_matmuls_and_other_dtypes_keep_torch_linear():
    torch.manual_seed(1)
    model = _Tiny().to(torch.bfloat16)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    want = model.down(x)
    packed = pack_linears(model)
    if bf16_supported():
        assert packed == 3 and type(model.down) is PackedLinear
        torch.testing.assert_close(model.down(x), want, atol=1e-2, rtol=1e-2)
    else:
        assert packed == 0 and type(model.down) is nn.Linear
    assert pack_linears(_Tiny().to(torch.float16)) == 0
