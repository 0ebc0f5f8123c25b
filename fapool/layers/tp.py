"""Megatron tensor parallelism applied to a loaded model after the fact (gpt-fast's apply_tp):
the model file stays TP-agnostic.

Per decoder layer, on tensor-parallel rank r of t:
    qkv_proj, gate_up_proj / up_proj   column-parallel: each part (q, k, v; gate, up) keeps
                                       its r-th 1/t of rows, i.e. q heads r*H/t.. and KV heads
                                       r*Hkv/t.. (q head h reads KV head h // (H/Hkv): local)
    o_proj, down_proj                  row-parallel: the r-th 1/t of input columns, and the
                                       partial outputs are summed by an all-reduce (a hook)
Embeddings, norms and the LM head are replicated, so every rank's hidden state is the whole
[T, hidden] and the result equals the single-process model up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from fapool.config import ConfigError, ModelConfig

AllReduce = Callable[[torch.Tensor], None]  # in-place sum across the tensor-parallel group

COLUMN = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


def check_tp(config: ModelConfig, tp_size: int) -> None:
    """Raise ConfigError when the model's heads or FFN cannot be split tp_size ways."""
    if tp_size == 1:
        return
    for name, value in (
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if value % tp_size:
            raise ConfigError(
                f"tensor_parallel_size {tp_size} does not divide {name} ({value}): every rank must hold "
                f"whole heads (query and KV) and an equal FFN slice; choose a divisor of "
                f"num_key_value_heads ({config.num_key_value_heads})"
            )


def row_partial(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel linear's local partial sum, without its all-reduce hook (CUDA graphs
    capture the work around the all-reduce, which runs between them)."""
    return F.linear(x, linear.weight, linear.bias)


def _parts(linear: nn.Linear) -> tuple[int, ...]:
    return tuple(getattr(linear, "output_sizes", (linear.out_features,)))


def shard_linear(linear: nn.Linear, style: str, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a linear's parameters (new contiguous tensors, the linear untouched)."""
    w = linear.weight
    if style == "column":
        rows, offset = [], 0
        for n in _parts(linear):
            local = n // tp_size
            rows.append(
                torch.arange(offset + tp_rank * local, offset + (tp_rank + 1) * local, device=w.device)
            )
            offset += n
        idx = torch.cat(rows)
        out = {"weight": w.index_select(0, idx)}
        if linear.bias is not None:
            out["bias"] = linear.bias.index_select(0, idx)
        return out
    if linear.bias is not None:
        raise ConfigError("row-parallel linears with a bias are not supported (no model here has one)")
    local = linear.in_features // tp_size
    return {"weight": w[:, tp_rank * local : (tp_rank + 1) * local].contiguous()}


def shard_layer_state(layer: nn.Module, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Every parameter of one decoder layer as tensor-parallel rank `tp_rank` holds it (names
    relative to the layer). The driver uses it to ship other ranks their weights."""
    modules = dict(layer.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, param in layer.named_parameters():
        state[name] = param.detach()
    for style, names in (("column", COLUMN), ("row", ROW)):
        for mname in names:
            if mname in modules:
                for pname, t in shard_linear(modules[mname], style, tp_rank, tp_size).items():
                    state[f"{mname}.{pname}"] = t
    return state


def _set_linear(linear: nn.Linear, tensors: dict[str, torch.Tensor]) -> None:
    linear.weight = nn.Parameter(tensors["weight"], requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape
    if "bias" in tensors:
        linear.bias = nn.Parameter(tensors["bias"], requires_grad=False)
    if hasattr(linear, "output_sizes"):  # MergedLinear: every part shrank by the same factor
        tp = sum(linear.output_sizes) // linear.out_features
        linear.output_sizes = tuple(n // tp for n in linear.output_sizes)
        offsets = [0]
        for n in linear.output_sizes:
            offsets.append(offsets[-1] + n)
        linear._ranges = {name: (offsets[i], offsets[i + 1]) for i, name in enumerate(linear.shard_names)}


def apply_tp(
    model: nn.Module,
    tp_rank: int,
    tp_size: int,
    group=None,
    *,
    all_reduce: AllReduce | None = None,
    layers: range | None = None,
) -> nn.Module:
    """Rewrite a LlamaForCausalLM in place for tensor-parallel rank `tp_rank` of `tp_size`:
    slice the linears of `layers` (default all), set the attention modules' local head
    counts, and sum row-parallel outputs with `all_reduce` (default: dist.all_reduce over
    `group`). Works on a meta-device model too (shapes only), which is how workers build
    their shard before the weights arrive."""
    check_tp(model.config, tp_size)
    if tp_size == 1:
        return model
    if all_reduce is None:

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=group)

    def reduce_hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        all_reduce(output)
        return output

    blocks = model.model.layers
    for i in layers if layers is not None else range(len(blocks)):
        layer = blocks[i]
        modules = dict(layer.named_modules())
        for style, names in (("column", COLUMN), ("row", ROW)):
            for mname in names:
                if mname in modules:
                    linear = modules[mname]
                    _set_linear(linear, shard_linear(linear, style, tp_rank, tp_size))
                    if style == "row":
                        linear.register_forward_hook(reduce_hook)
        attn = layer.self_attn
        attn.num_heads //= tp_size
        attn.num_kv_heads //= tp_size
    return model
