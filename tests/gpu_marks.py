"""The skip marks of the GPU tests, in one place (CI has no GPU, so these tests skip there)."""

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter on CPU tensors
HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Triton kernels: on a CUDA GPU, or on the CPU through the interpreter (TRITON_INTERPRET=1).
needs_triton = pytest.mark.skipif(
    not ((torch.cuda.is_available() or INTERPRET) and HAVE_TRITON),
    reason="needs a CUDA GPU with triton, or TRITON_INTERPRET=1 with triton installed (interpreter on CPU)",
)
# CUDA graphs, cuDNN, the engine on a GPU: a CUDA GPU with triton.
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and triton"
)
