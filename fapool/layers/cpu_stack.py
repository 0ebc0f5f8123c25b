"""A quantized model's decode steps in one C call (cpu_stack.c): every layer's kernels run back
to back without the Python, views and small tensors between them, which at decode sizes cost as
much as a third of the step. The hidden states equal LlamaModel.forward_steps' with the same
kernels bit for bit (tests/layers/test_cpu_stack.py), so the stack is only a faster route.

`DecodeStack.attach(model)` gives a quantized, CPU-fused LlamaForCausalLM a stack when every
layer has the shape the kernels take; `LlamaModel.forward` then sends a step through it when
`runs` says the step is one it takes (decode only, at most cpu_int4.MAX_ROWS sequences, a bf16
paged cache the decode kernel reads, every key visible) and takes its own path otherwise."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fapool import native
from fapool.attention import cpu_decode
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.torch_ref import TorchReferenceBackend, decode_plan
from fapool.layers import cpu_fused, cpu_int4
from fapool.layers.cpu_fused import CpuFusedAttention, CpuFusedMLP, CpuFusedRMSNorm

SOURCE = Path(__file__).with_name("cpu_stack.c")
_P = ctypes.c_void_p


class _Int4Weight(ctypes.Structure):
    _fields_ = [("data", _P), ("scale", _P), ("offset", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _Int4Weight), ("o", _Int4Weight),
                ("gate_up", _Int4Weight), ("down", _Int4Weight)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                                     "intermediate", "block_size")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)),
                ("final_norm", _P),
                *((name, _P) for name in ("int4_matmul", "add_rms_norm", "rotary", "silu_mul", "decode", "write_kv"))]


@functools.cache
def load() -> ctypes.CDLL | None:
    """The stack's library, or None where it or one of the kernels it calls cannot run here."""
    if cpu_int4.load() is None or cpu_fused.load() is None or cpu_decode.load() is None:
        return None
    lib = native.build(SOURCE)
    if lib is None or not lib.fapool_stack_supported():
        return None
    fn = lib.fapool_stack_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [_P, _P, ctypes.c_int, _P, _P, ctypes.c_int64, _P, _P, _P, _P, ctypes.c_int, _P, ctypes.c_int, _P]
    return lib


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _int4(linear) -> _Int4Weight | None:
    """A linear's packed int4 weight, where the kernel alone computes it (no bias, no other path)."""
    w = getattr(linear, "native_int4", None)
    if w is None or getattr(linear, "bias", None) is not None:
        return None
    return _Int4Weight(w.data.data_ptr(), w.scale.data_ptr(), w.offset.data_ptr())


def _norm_weight(norm) -> int | None:
    ok = type(norm) is CpuFusedRMSNorm and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous()
    return norm.weight.data_ptr() if ok else None


class DecodeStack:
    def __init__(self, model, layers: list[_Layer]) -> None:
        inner, config = model.model, model.config
        self.model = inner
        self.layers = (_Layer * len(layers))(*layers)  # the C structs point into the model's tensors
        self.lib = load()
        attn = inner.layers[0].self_attn
        self.spec = _Model(
            num_layers=len(layers), hidden=config.hidden_size, num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, intermediate=config.intermediate_size,
            block_size=0, eps=inner.norm.eps, scale=attn.scale, layers=self.layers,
            final_norm=inner.norm.weight.data_ptr(), int4_matmul=_address(cpu_int4.load().fapool_int4_matmul),
            add_rms_norm=_address(cpu_fused.load().fapool_add_rms_norm), rotary=_address(cpu_fused.load().fapool_rotary_bf16),
            silu_mul=_address(cpu_fused.load().fapool_silu_mul_bf16),
            decode=_address(cpu_decode.load().fapool_decode_attention), write_kv=_address(cpu_decode.load().fapool_write_kv),
        )

    @classmethod
    def attach(cls, model) -> DecodeStack | None:
        """Give `model` (LlamaForCausalLM, quantized and CPU-fused) a stack where its layers are
        ones the kernels take; returns it, or None (the model keeps its Python path)."""
        inner = getattr(model, "model", None)
        if load() is None or inner is None or not len(getattr(inner, "layers", ())):
            return None
        layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights = [_int4(attn.qkv_proj), _int4(attn.o_proj)]
            if type(mlp) is CpuFusedMLP and mlp.gated and mlp.act.name == "silu":
                weights += [_int4(mlp.gate_up_proj), _int4(mlp.down_proj)]
            norms = [_norm_weight(layer.input_layernorm), _norm_weight(layer.post_attention_layernorm)]
            if (
                type(attn) is not CpuFusedAttention or type(attn.backend) is not TorchReferenceBackend
                or len(weights) < 4 or None in weights or None in norms
                or attn.num_heads % attn.num_kv_heads or attn.head_dim % 2
                or {layer.input_layernorm.eps, layer.post_attention_layernorm.eps} != {inner.norm.eps}
            ):
                return None
            layers.append(_Layer(*norms, *weights))
        float32 = (inner.norm.weight, inner.embed_tokens.weight, inner.rotary_emb.cos_sin_cache)
        if _norm_weight(inner.norm) is None or any(t.dtype != torch.float32 for t in float32):
            return None
        stack = cls(model, layers)
        inner.decode_stack = stack
        return stack

    def runs(self, meta: AttentionMetadata, kv_caches) -> bool:
        """Whether this step is one the stack computes as the model's own path would."""
        t = meta.num_tokens
        if not (meta.is_decode_only and 0 < t == meta.num_seqs <= cpu_int4.MAX_ROWS):
            return False
        k_cache = kv_caches[0][0]
        attn = self.model.layers[0].self_attn
        if k_cache.dtype != torch.bfloat16 or attn.kv_scales is not None:
            return False
        plan = decode_plan(attn.backend, meta, k_cache, attn.num_heads // attn.num_kv_heads)
        return plan.native and plan.all_decode and not plan.multi  # native: the C decode takes this cache

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches, meta: AttentionMetadata):
        """Embedded tokens x [T, hidden] float32 -> final-normed hidden [T, hidden]; writes the
        step's K and V into the caches."""
        attn = self.model.layers[0].self_attn
        plan = decode_plan(attn.backend, meta, kv_caches[0][0], attn.num_heads // attn.num_kv_heads)
        k_caches = (ctypes.c_void_p * len(kv_caches))(*(k.data_ptr() for k, _ in kv_caches))
        v_caches = (ctypes.c_void_p * len(kv_caches))(*(v.data_ptr() for _, v in kv_caches))
        self.spec.block_size = kv_caches[0][0].shape[1]
        x, slots = x.contiguous(), meta.slot_mapping.contiguous()
        out = torch.empty_like(x)
        n = x.shape[0]
        rc = self.lib.fapool_stack_decode(
            ctypes.byref(self.spec), x.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), cos.stride(0), k_caches,
            v_caches, slots.data_ptr(), plan.tables32.data_ptr(), plan.tables32.shape[1], plan.lens32.data_ptr(),
            cpu_decode.split_parts(n, plan.max_len), out.data_ptr(),
        )
        if rc == -2:
            raise MemoryError("cpu_stack: no memory for the step's buffers")
        if rc != 0:
            raise RuntimeError(f"cpu_stack: a kernel failed ({rc})")
        return out
