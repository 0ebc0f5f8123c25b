"""The FFN activations ModelConfig.hidden_act may name (the strings Hugging Face uses)."""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

# gelu_new and gelu_pytorch_tanh are the same function (tanh approximation); "gelu" is exact (erf).
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
