"""Linears that hold several Hugging Face projections side by side (q|k|v, gate|up).

One matmul instead of three (or two); the weights arrive as separate checkpoint tensors
and `load_shard` copies each into its row range. `output_sizes` records the split so a
later tensor-parallel rewrite can shard every part on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MergedLinear(nn.Linear):
    def __init__(
        self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str], bias: bool
    ) -> None:
        if len(output_sizes) != len(shard_names):
            raise ValueError("MergedLinear needs one name per output part")
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)
        self.shard_names = tuple(shard_names)
        offsets = [0]
        for n in output_sizes:
            offsets.append(offsets[-1] + n)
        self._ranges = {name: (offsets[i], offsets[i + 1]) for i, name in enumerate(shard_names)}

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`param` is "weight" or "bias") into its rows."""
        start, end = self._ranges[shard]
        target = getattr(self, param)
        if target is None:
            raise ValueError(f"{shard} has no {param} in this model")
        part = target.data[start:end]
        if tuple(tensor.shape) != tuple(part.shape):
            raise ValueError(
                f"shape mismatch loading {shard}.{param}: checkpoint {tuple(tensor.shape)}, "
                f"expected {tuple(part.shape)}"
            )
        part.copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split an output along its last dim into the parts, in order."""
        return out.split(self.output_sizes, dim=-1)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.shard_names, self.output_sizes))
        return f"{super().extra_repr()}, parts=({parts})"
