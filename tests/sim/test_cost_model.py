import json

import numpy as np
import pytest

from fapool.sim.cost_model import CostModel, load_model_config
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import LinkProfile, get_hardware


def test_gemm_roofline_regimes(h100_cost):
    hw = h100_cost.hw
    n = k = 4096
    # m = 1: memory-bound, time ~ streaming the weight once.
    t1 = h100_cost.gemm(1, n, k)
    assert t1 == pytest.approx(hw.kernel_overhead + (k * n + k + n) * 2 / hw.gemm_bandwidth)
    # m = 8192: compute-bound.
    t_big = h100_cost.gemm(8192, n, k)
    assert t_big == pytest.approx(hw.kernel_overhead + 2 * 8192 * n * k / hw.gemm_flops)
    # Below the ridge point doubling m barely changes time; above it time doubles.
    assert h100_cost.gemm(2, n, k) < 1.01 * t1
    assert h100_cost.gemm(16384, n, k) == pytest.approx(2 * t_big - hw.kernel_overhead, rel=1e-6)
    assert h100_cost.gemm(0, n, k) == 0.0
    # Array and scalar paths agree.
    arr = h100_cost.gemm(np.array([0, 1, 8192]), n, k)
    np.testing.assert_allclose(arr, [0.0, t1, t_big])


def test_decode_attention_is_linear_in_kv_and_split_by_heads(h100_cost):
    a = h100_cost.attention(1_000_000, 1_000_000, 64)
    b = h100_cost.attention(2_000_000, 2_000_000, 64)
    o = h100_cost.hw.attn_overhead
    assert (b - o) / (a - o) == pytest.approx(2.0, rel=0.01)
    # One TP rank of eight reads an eighth of the KV.
    assert h100_cost.attention(1_000_000, 1_000_000, 64, 1 / 8) - o == pytest.approx((a - o) / 8, rel=1e-6)
    # KV bytes: seed000 is MHA, 32 heads x 128 x 2 (K, V) x 2 bytes per layer.
    assert h100_cost.kv_bytes_per_token_layer() == 32 * 128 * 2 * 2
    assert h100_cost.kv_bytes_per_token() == 4 * 32 * 128 * 2 * 2


def test_collectives(h100_cost):
    link = h100_cost.hw.intra_node
    assert h100_cost.allreduce(1 << 20, 1) == 0.0
    t = h100_cost.allreduce(1 << 20, 8)
    assert t == pytest.approx(link.latency + 14 * link.hop_latency + 2 * 7 / 8 * (1 << 20) / link.bandwidth)
    assert h100_cost.p2p(0) == 0.0
    ib = h100_cost.hw.inter_node
    assert h100_cost.p2p(1e6, same_node=False) == pytest.approx(ib.latency + 1e6 / ib.bandwidth)


def test_model_resolution(tmp_path):
    m = load_model_config("seed000")
    assert (m.num_hidden_layers, m.hidden_size, m.intermediate_size) == (4, 4096, 16384)
    cfg = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m2 = load_model_config(str(tmp_path))
    assert m2.head_dim == 64 and m2.num_key_value_heads == 2
    with pytest.raises(SimInputError, match="unknown model"):
        load_model_config("no-such-model")
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(SimInputError, match="unsupported architecture"):
        load_model_config(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SimInputError, match="missing hidden_size"):
        load_model_config(str(tmp_path / "short.json"))


def test_hardware_presets_and_errors():
    h100, h200 = get_hardware("h100"), get_hardware("H200")
    assert h200.attn_bandwidth > h100.attn_bandwidth and h200.memory_bytes > h100.memory_bytes
    assert get_hardware("cpu").dtype_bytes == 4
    with pytest.raises(SimInputError, match="unknown hardware"):
        get_hardware("tpu-v9")
    with pytest.raises(SimInputError):
        LinkProfile(bandwidth=0, latency=0)
    with pytest.raises(SimInputError):
        CostModel(load_model_config("seed000"), h100.replace(gemm_flops=0))
