"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A kernel launched with PDL may start before the kernel ahead of it in the stream has finished:
its programs become resident as soon as every program of the one ahead has called
`launch_dependents` (or exited), and `wait_predecessor` blocks until that kernel has finished and
its writes are visible. Inside a CUDA-graphed decode step of ~50 short kernels this hides part of
each launch and ramp behind the previous kernel's tail.

The contract every kernel launched with `pdl_launch` keeps: `wait_predecessor` runs in every
program before any read of another kernel's output and before any write, so ordering holds
transitively down the stream. Kernels that stream a large input (the small-M matmul, the decode
attention) call `launch_dependents` after their main loop, small ones at their start: in a
probe of seed000's step shape a trigger at the matmuls' start was slower than no PDL at all, and
loading weights ahead of the wait lost too (benchmarks/pdl_probe.py; figures in RESULTS.md).

FAPOOL_PDL=0 turns it off (A/B runs); it is off on CPU tensors and before compute capability 9.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def wait_predecessor(USE_PDL: tl.constexpr):
    """Block until the kernel ahead in the stream has finished and its writes are visible."""
    if USE_PDL:
        tl.inline_asm_elementwise(
            "griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    """Let the next kernel in the stream launch (it still waits for this one before reading)."""
    if USE_PDL:
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@functools.lru_cache(maxsize=16)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL (read per call, so A/B runs can flip it)."""
    return t.is_cuda and os.environ.get("FAPOOL_PDL", "1") != "0" and _capable(t.device.index or 0)


def pdl_launch(enabled: bool) -> dict:
    """The launch keyword of a kernel compiled with USE_PDL=enabled."""
    return {"launch_pdl": True} if enabled else {}
