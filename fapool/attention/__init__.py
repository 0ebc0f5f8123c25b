"""Attention backends: a torch reference (CPU, tests) and Triton kernels (GPU)."""

from fapool.attention.backend import AttentionBackend, merge_partials, merge_tree
from fapool.attention.metadata import AttentionMetadata
from fapool.attention.torch_ref import TorchReferenceBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchReferenceBackend", "merge_partials", "merge_tree"]
