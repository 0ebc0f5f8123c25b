"""RMSNorm, computed the way Hugging Face's LlamaRMSNorm computes it."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize in float32, cast back to the input dtype, *then* scale by the weight.

    The order matters in half precision: HF multiplies the weight into the already-rounded
    activations (`weight * x.to(input_dtype)`), so doing the same keeps greedy tokens equal.
    """
    input_dtype = x.dtype
    if x.device.type == "cpu" and input_dtype == weight.dtype == torch.float32:
        # aten's fused CPU kernel: one pass, the same bits (tests/layers/test_norm.py).
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(input_dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm: (x + delta, norm(x + delta)); one kernel on a GPU."""
        x = x + delta
        return x, self(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
