"""Pick the attention backend for a device: Triton kernels on CUDA, the torch reference on CPU."""

from __future__ import annotations

from fapool.attention.backend import AttentionBackend


def make_backend(name: str | None, device: str) -> AttentionBackend:
    if name is None:
        name = "triton" if device.startswith("cuda") else "torch"
    if name == "torch":
        from fapool.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend()
    if name == "triton":
        from fapool.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose torch or triton")
