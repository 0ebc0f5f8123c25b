"""LlamaForCausalLM against transformers' models (Llama 3 with llama3 RoPE scaling and GQA,
Qwen2 with qkv bias and tied embeddings, Mistral MHA) over a shuffled paged KV cache, and
the non-gated GELU variant against a plain dense reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM as HFLlama,
    MistralConfig,
    MistralForCausalLM as HFMistral,
    Qwen2Config,
    Qwen2ForCausalLM as HFQwen2,
)

from fapool.attention import AttentionMetadata, TorchReferenceBackend
from fapool.config import ModelConfig, RopeScaling
from fapool.models.llama import LlamaForCausalLM
from fapool.models.registry import build_model
from tiny_models import randomize  # larger-than-init weights, random biases and norms

BLOCK_SIZE = 16
NUM_BLOCKS = 64
ATOL = 1e-4
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def _llama():
    cfg = LlamaConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return "llama", HFLlama, cfg


def _qwen2():
    cfg = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return "qwen2", HFQwen2, cfg


def _mistral():
    cfg = MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)
    return "mistral", HFMistral, cfg


def _model_config(arch: str, hf) -> ModelConfig:
    """By hand from the HF config fields (the real loader lives in fapool.models.hf_loader)."""
    rope = hf.rope_parameters
    scaling = None
    if rope.get("rope_type", "default") == "llama3":
        scaling = RopeScaling(
            rope_type="llama3",
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope["rope_theta"],
        rope_scaling=scaling,
        hidden_act=hf.hidden_act,
        attention_bias=arch == "qwen2" or getattr(hf, "attention_bias", False),
        tie_word_embeddings=hf.tie_word_embeddings,
    )


class PagedRunner:
    """Drives LlamaForCausalLM over a shuffled paged cache, one forward per `step` call."""

    def __init__(self, model: LlamaForCausalLM, seed: int = 0):
        cfg = model.config
        shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.model = model
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> list[torch.Tensor]:
        """chunks: seq id -> new token ids. Returns logits [len(chunk), vocab] per sequence."""
        ids, positions, slots, qlens, starts, kvlens, tables = [], [], [], [], [], [], []
        for sid, toks in chunks.items():
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            ids += toks
            positions += range(start, end)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            qlens.append(len(toks))
            starts.append(start)
            kvlens.append(end)
            tables.append(list(table))
            self.lens[sid] = end
        meta = AttentionMetadata.build(qlens, starts, kvlens, tables, slots)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
            logits = self.model.compute_logits(hidden)
        assert hidden.shape == (len(ids), self.model.config.hidden_size)
        assert logits.dtype == torch.float32
        return list(logits.split(qlens))


ARCHS = dict(params=[_llama, _qwen2, _mistral], ids=["llama3-gqa", "qwen2-tied", "mistral-mha"])


@pytest.fixture(scope="module", **ARCHS)
def pair(request):
    """(our model, HF model, prompts) with the same weights."""
    torch.manual_seed(0)
    arch, hf_cls, hf_cfg = request.param()
    hf = hf_cls(hf_cfg).eval()
    randomize(hf, seed=1)
    ours = build_model(_model_config(arch, hf_cfg), TorchReferenceBackend(), torch.float32, "cpu")
    ours.load_weights(hf.state_dict().items())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, hf_cfg.vocab_size, (n,), generator=g).tolist() for n in (37, 300)]
    with torch.no_grad():
        expected = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
    return ours, hf, prompts, expected


def test_weights_tied_and_fused(pair):
    ours, hf, _, _ = pair
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    attn = ours.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes, dim=0)
    hf_attn = hf.model.layers[1].self_attn
    assert torch.equal(q, hf_attn.q_proj.weight) and torch.equal(v, hf_attn.v_proj.weight)
    assert torch.equal(k, hf_attn.k_proj.weight)


@pytest.mark.parametrize("which", [0, 1], ids=["prefill37", "prefill300"])
def test_prefill_matches_hf(pair, which):
    ours, _, prompts, expected = pair
    (logits,) = PagedRunner(ours, seed=which).step({0: prompts[which]})
    torch.testing.assert_close(logits, expected[which], rtol=0, atol=ATOL)


def test_batched_prefill_then_decode_matches_hf(pair):
    """Both prompts prefilled in one flat batch (minus their last 4 tokens), then one
    decode token per sequence per step; every step's logits equal HF's full-sequence ones."""
    ours, _, prompts, expected = pair
    runner = PagedRunner(ours, seed=7)
    num_decode = 4
    out = runner.step({s: p[:-num_decode] for s, p in enumerate(prompts)})
    for s, p in enumerate(prompts):
        torch.testing.assert_close(out[s], expected[s][: len(p) - num_decode], rtol=0, atol=ATOL)
    for i in range(num_decode, 0, -1):
        out = runner.step({s: [p[-i]] for s, p in enumerate(prompts)})
        for s, p in enumerate(prompts):
            torch.testing.assert_close(out[s][0], expected[s][len(p) - i], rtol=0, atol=ATOL)


def test_chunked_prefill_mixed_with_decode_matches_hf(pair):
    """The 300-token prompt prefilled in chunks of 128 while the short one decodes alongside."""
    ours, _, (short, long), (exp_short, exp_long) = pair
    runner = PagedRunner(ours, seed=3)
    runner.step({0: short[:34]})
    for i, a in enumerate(range(0, len(long), 128)):
        out = runner.step({1: long[a : a + 128], 0: [short[34 + i]]})
        torch.testing.assert_close(out[0], exp_long[a : a + 128], rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1][0], exp_short[34 + i], rtol=0, atol=ATOL)


# --- seed-gelu: non-gated GELU FFN, MHA, vs a dense hand-written reference -----------------


def _seed_gelu_config(**changes) -> ModelConfig:
    base = dict(
        architecture="seed-gelu",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        hidden_act="gelu",
        gated_mlp=False,
    )
    return ModelConfig(**{**base, **changes})


def _random_checkpoint(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

    def w(*shape):
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1]) * 1.5

    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
            p + "input_layernorm.weight": 1 + 0.2 * torch.randn(h, generator=g),
            p + "post_attention_layernorm.weight": 1 + 0.2 * torch.randn(h, generator=g),
        }
    sd["model.norm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
    sd["lm_head.weight"] = w(cfg.vocab_size, h)
    return sd


def _dense_reference(cfg: ModelConfig, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Textbook pre-norm decoder: dense causal softmax attention, RoPE by rotate_half."""
    n, d, nh = len(ids), cfg.head_dim, cfg.num_attention_heads

    def norm(x, wt):
        return wt * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(n).float()[:, None] * inv_freq
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]

    def rope(x):  # [n, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    x = sd["model.embed_tokens.weight"][ids]
    mask = torch.ones(n, n).tril().bool()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        hn = norm(x, sd[p + "input_layernorm.weight"])
        q = rope((hn @ sd[p + "self_attn.q_proj.weight"].T).view(n, nh, d))
        k = rope((hn @ sd[p + "self_attn.k_proj.weight"].T).view(n, nh, d))
        v = (hn @ sd[p + "self_attn.v_proj.weight"].T).view(n, nh, d)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, nh * d)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        hn = norm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + F.gelu(hn @ sd[p + "mlp.up_proj.weight"].T) @ sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_seed_gelu_matches_dense_reference():
    cfg = _seed_gelu_config()
    sd = _random_checkpoint(cfg, seed=0)
    model = build_model(cfg, TorchReferenceBackend(), torch.float32, "cpu")
    model.load_weights(sd.items())
    assert not hasattr(model.model.layers[0].mlp, "gate_up_proj")
    ids = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = _dense_reference(cfg, sd, ids)

    runner = PagedRunner(model, seed=5)
    (prefill,) = runner.step({0: ids[:17]})
    torch.testing.assert_close(prefill, expected[:17], rtol=0, atol=ATOL)
    for j in range(17, len(ids)):
        (step,) = runner.step({0: [ids[j]]})
        torch.testing.assert_close(step[0], expected[j], rtol=0, atol=ATOL)


def test_long_cpu_prefill_mlp_in_row_blocks_equals_one_pass(monkeypatch):
    import fapool.models.llama as llama

    cfg = _seed_gelu_config()
    model = build_model(cfg, TorchReferenceBackend(), torch.float32, "cpu")
    model.init_random_weights(seed=0)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2 * llama.CPU_MLP_ROWS + 37, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    blocks = []
    one_pass = type(mlp).activated
    monkeypatch.setattr(mlp, "activated", lambda rows: blocks.append(len(rows)) or one_pass(mlp, rows))
    got = mlp(x)
    assert blocks == [llama.CPU_MLP_ROWS, llama.CPU_MLP_ROWS, 37]
    torch.testing.assert_close(got, mlp.down_proj(one_pass(mlp, x)), rtol=1e-6, atol=1e-6)


# --- load_weights contract and random init ------------------------------------------------


def test_load_weights_errors_and_ignores():
    cfg = _seed_gelu_config(num_hidden_layers=1)
    sd = _random_checkpoint(cfg, seed=0)
    model = build_model(cfg, TorchReferenceBackend(), torch.float32, "cpu")
    model.load_weights([*sd.items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))])

    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.gate_proj.weight'"):
        model.load_weights([*sd.items(), ("model.layers.0.mlp.gate_proj.weight", torch.ones(128, 64))])
    partial = {k: v for k, v in sd.items() if "k_proj" not in k and k != "model.norm.weight"}
    missing = r"missing.*model.layers.0.self_attn.k_proj.weight.*model.norm.weight"
    with pytest.raises(ValueError, match=missing):
        model.load_weights(partial.items())
    bad = dict(sd, **{"model.layers.0.self_attn.v_proj.weight": torch.ones(3, 64)})
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_weights(bad.items())


def test_qkv_bias_required_when_configured():
    cfg = _seed_gelu_config(num_hidden_layers=1, attention_bias=True, tie_word_embeddings=True)
    sd = _random_checkpoint(cfg, seed=0)
    del sd["lm_head.weight"]
    model = build_model(cfg, TorchReferenceBackend(), torch.float32, "cpu")
    with pytest.raises(ValueError, match="q_proj.bias"):
        model.load_weights(sd.items())


def test_build_model_dtype_and_random_init():
    cfg = _seed_gelu_config()
    a = build_model(cfg, TorchReferenceBackend(), torch.bfloat16, "cpu")
    b = build_model(cfg, TorchReferenceBackend(), torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert a.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    a.init_random_weights(seed=3)
    b.init_random_weights(seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    std = a.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.018 < std < 0.022
    # A bf16 model runs end to end.
    runner = PagedRunner(a)
    runner.kv_caches = [(k.bfloat16(), v.bfloat16()) for k, v in runner.kv_caches]
    (logits,) = runner.step({0: [1, 2, 3, 4, 5]})
    assert logits.shape == (5, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("make", ARCHS["params"], ids=ARCHS["ids"])
def test_hand_config_agrees_with_hf_loader(make):
    """The hand-built configs above describe the same model the checkpoint loader reads."""
    from fapool.models.hf_loader import config_from_dict

    arch, _, hf_cfg = make()
    loaded = config_from_dict(hf_cfg.to_dict())
    ours = _model_config(arch, hf_cfg)
    assert loaded.replace(bos_token_id=None, eos_token_ids=(), sliding_window=None) == ours
