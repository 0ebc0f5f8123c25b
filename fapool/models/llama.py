"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2 and the non-gated GELU FFN
of the FA Pool paper ("seed-gelu"), in GQA or MHA.

Tokens are flat: every tensor is [T, ...] over all sequences of the step, no batch dim and
no padding; `AttentionMetadata` says which tokens belong to which sequence. Module names
mirror Hugging Face's (model.layers.{i}.self_attn...), except that q/k/v and gate/up are
fused into one linear each at load time.

    input_ids, positions [T] -> embed -> N x DecoderLayer -> norm -> hidden [T, hidden]
    DecoderLayer: x + Attention(RMSNorm(x)), then h + MLP(RMSNorm(h))
    Attention:    qkv_proj -> rotary(q, k) -> attend (write_kv + backend.forward) -> o_proj
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable

import torch
from torch import nn

from fapool.attention.backend import AttentionBackend
from fapool.attention.kv_quant import KVScales
from fapool.attention.metadata import AttentionMetadata
from fapool.config import ModelConfig
from fapool.layers.activation import Activation
from fapool.layers.linear import MergedLinear
from fapool.layers.norm import RMSNorm
from fapool.layers.rotary import RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # k_cache, v_cache: [num_blocks, block_size, Hkv, D]

# Checkpoint projection -> (our fused module, its part name).
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, layer_idx: int) -> None:
        super().__init__()
        self.backend = backend
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.kv_scales: KVScales | None = None  # set when the KV cache is FP8 (kv_quant)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, (q_size, kv_size, kv_size), ("q", "k", "v"), bias=config.attention_bias
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """[T, hidden] -> q [T, H, D], k, v [T, Hkv, D], rotary applied. q and k lie side by
        side in the projection's output, so one rotary pass serves both (q, k: views of it)."""
        num_tokens, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        nq, nk = (size // d for size in self.qkv_proj.output_sizes[:2])
        qk = self.rotate(qkv[:, : (nq + nk) * d].view(num_tokens, nq + nk, d), cos, sin)
        return qk[:, :nq], qk[:, nq:], qkv[:, (nq + nk) * d :].view(num_tokens, nk, d)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [T, heads, D] (a fused subclass may replace it)."""
        return apply_rotary(x, cos, sin)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention result [T, H, D] -> [T, hidden]."""
        return self.o_proj(out.reshape(out.shape[0], self.num_heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D/2]
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.output(self.attend(q, k, v, kv_cache, meta))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Store this step's K/V, then attend over the paged cache. The one place attention
        runs: the attention pool overrides it to send long sequences elsewhere."""
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, self.kv_scales)
        out, _lse = self.backend.forward(q, k_cache, v_cache, meta, self.scale, self.kv_scales, new_kv=(k, v))
        return out


# A long CPU prefill's MLP runs in row blocks: a block's intermediates (6x the hidden size)
# stay in cache between the projections and the activation.
CPU_MLP_ROWS = 512


class MLP(nn.Module):
    """SwiGLU-style `down(act(gate(x)) * up(x))`, or `down(act(up(x)))` when not gated."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_up_proj = MergedLinear(h, (f, f), ("gate", "up"), bias=False)
        else:
            self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act = Activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] > CPU_MLP_ROWS:  # rows are independent
            return torch.cat([self.down_proj(self.activated(rows)) for rows in x.split(CPU_MLP_ROWS)])
        return self.down_proj(self.activated(x))

    def activated(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input."""
        if self.gated:
            return self.act_and_mul(self.gate_up_proj(x))
        return self.act(self.up_proj(x))

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up from the merged projection's output (a fused subclass may replace it)."""
        gate, up = self.gate_up_proj.split(gate_up)
        return self.act(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """One layer on its own (tests, tools); LlamaModel.forward_steps runs the same
        sequence split at the attention call."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    # A quantized CPU model's decode steps in one C call, where one was attached (cpu_stack.DecodeStack).
    decode_stack = None

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(DecoderLayer(config, backend, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        stack = self.decode_stack
        if stack is not None and stack.runs(meta, kv_caches):
            return stack(self.embed_tokens(input_ids), *self.rotary_emb(positions), kv_caches, meta)
        return run_steps(self.forward_steps(input_ids, positions, kv_caches, LocalAttend(self.layers, meta)))

    def forward_steps(
        self,
        x: torch.Tensor,  # input ids [T] on the first stage, else hidden [T, hidden]
        positions: torch.Tensor,
        kv_caches: list[KVCache],  # one per layer in `layers`
        attend: AttendFn,
        layers: range | None = None,  # a pipeline stage's layers; default all
        ffn: FFNFn | None = None,  # where each layer's FFN runs; default this model's MLPs
    ) -> Generator[None, None, torch.Tensor]:
        """The layer loop as a generator that yields while attention (or, disaggregated, the
        FFN) is in flight, so a driver can interleave micro-batches: the local work of one
        runs while the remote work of another is computed elsewhere (seed 000's asynchronous
        execution, seed 004's ping-pong, seed 002's attention-FFN micro-batches). Returns
        hidden [T, hidden], final-normed on the last stage."""
        layers = layers if layers is not None else range(len(self.layers))
        if len(kv_caches) != len(layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(layers)} layers")
        if layers.start == 0:
            x = self.embed_tokens(x)
        cos, sin = self.rotary_emb(positions)  # looked up once, shared by all layers
        last = layers.stop == len(self.layers)
        delta = None  # the last FFN output; the next norm adds it to x (one fused kernel on a GPU)
        for i, kv_cache in zip(layers, kv_caches):
            layer = self.layers[i]
            if delta is None:
                h = layer.input_layernorm(x)
            else:
                x, h = layer.input_layernorm.add_forward(x, delta)
            q, k, v = layer.self_attn.project(h, cos, sin)
            pending = attend(i, q, k, v, kv_cache)
            if pending.in_flight:
                yield
            x, h = layer.post_attention_layernorm.add_forward(x, layer.self_attn.output(pending.result()))
            if ffn is None:
                delta = layer.mlp(h)
                continue
            pending = ffn(i, h)
            if pending.in_flight:
                yield
            delta = pending.result()
        if delta is None:
            return self.norm(x) if last else x
        return self.norm.add_forward(x, delta)[1] if last else x + delta


class Pending:
    """An attention result, ready now or once its `finish` callable has run."""

    __slots__ = ("_value", "_finish")

    def __init__(self, value: torch.Tensor | None = None, finish: Callable[[], torch.Tensor] | None = None):
        self._value = value
        self._finish = finish

    @property
    def in_flight(self) -> bool:
        return self._finish is not None

    def result(self) -> torch.Tensor:
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        return self._value  # type: ignore[return-value]


AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, KVCache], Pending]
FFNFn = Callable[[int, torch.Tensor], Pending]  # (layer, normed hidden [T, hidden]) -> FFN output


class LocalAttend:
    """All KV on this worker: each layer's own Attention.attend, synchronously."""

    def __init__(self, layers: nn.ModuleList, meta: AttentionMetadata) -> None:
        self.layers = layers
        self.meta = meta

    def __call__(self, layer_idx: int, q, k, v, kv_cache: KVCache) -> Pending:
        return Pending(self.layers[layer_idx].self_attn.attend(q, k, v, kv_cache, self.meta))


def run_steps(steps: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Drive one forward generator to completion."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],  # one (k_cache, v_cache) per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of every token; the caller picks the rows
        it needs logits for and passes them to `compute_logits`."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden).float()

    # --- weights -------------------------------------------------------------------------

    def _checkpoint_names(self) -> set[str]:
        """Every Hugging Face tensor name this model needs (fused params expanded)."""
        names = set()
        for name, _ in self.named_parameters():  # shared (tied) params listed once
            module, _, param = name.rpartition(".")
            prefix, _, leaf = module.rpartition(".")
            if leaf in ("qkv_proj", "gate_up_proj"):
                names.update(f"{prefix}.{hf}.{param}" for hf, (ours, _) in _FUSED.items() if ours == leaf)
            else:
                names.add(name)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in (cast to the parameter dtype and device).

        Raises ValueError on a name the model does not have, a shape mismatch, or, at the
        end, on parameters the checkpoint did not provide."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        expected = self._checkpoint_names()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints store it; we rebuild it from the config
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # shares embed_tokens, which the checkpoint also holds
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture} model")
            module_name, _, param = name.rpartition(".")
            prefix, _, proj = module_name.rpartition(".")
            fused, part = _FUSED.get(proj, (None, None))
            if fused is not None and f"{prefix}.{fused}" in modules:
                modules[f"{prefix}.{fused}"].load_shard(part, param, tensor)
            else:
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                        f"model {tuple(target.shape)}"
                    )
                target.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise ValueError(f"checkpoint is missing weights: {shown}")

    @torch.no_grad()
    def init_random_weights(self, seed: int) -> None:
        """Random weights for presets and benchmarks: N(0, 0.02) matrices, zero biases,
        norm weights 1. Same seed, same device type -> same weights."""
        generator = None
        for name, p in self.named_parameters():
            if generator is None:
                generator = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
