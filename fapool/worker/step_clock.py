"""Time a rank spends waiting on communication during a step, so that "compute" and
"communication" in the per-rank breakdown mean the same on the CPU and on a GPU.

- CPU, or CUDA tensors staged through host memory for gloo: a wait blocks the host, so host
  timestamps around it measure it. On CUDA the stream is synchronised first, so GPU work
  queued before the wait counts as compute rather than as communication.
- NCCL: a wait only makes the compute stream wait for the transfer; the host runs ahead.
  CUDA events recorded around it measure how long the stream stalled, and are read once, at
  the end of the step (one device synchronisation a step, none per wait).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class StepClock:
    def __init__(self, device: torch.device, stream_ordered: bool = False) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.stream_ordered = stream_ordered and self.on_gpu
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def measure(self, kind: str, wait: Callable[[], T]) -> T:
        """Run `wait` (a transfer or a wait on one) and add its time to `kind`."""
        if self.stream_ordered:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return wait()
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((kind, start, end))
        if self.on_gpu:
            torch.cuda.current_stream(self.device).synchronize()
        t0 = time.perf_counter()
        try:
            return wait()
        finally:
            self._seconds[kind] += time.perf_counter() - t0

    def add(self, kind: str, seconds: float) -> None:
        self._seconds[kind] += seconds

    def finish(self) -> dict[str, float]:
        """Seconds per kind so far. On a GPU, waits for the device first, so that a step's
        wall time read after this includes all the work it queued."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        for kind, start, end in self._events:
            self._seconds[kind] += start.elapsed_time(end) / 1e3
        self._events = []
        return dict(self._seconds)

    def get(self, kind: str) -> float:
        """Seconds of `kind` measured so far on the host (events are read by finish)."""
        return self._seconds.get(kind, 0.0)
