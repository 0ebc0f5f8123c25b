"""Process groups and point-to-point messages between the driver, dense and attention workers.

Every blocking wait has a timeout, and every failure names the peer, so a dead or hung
worker becomes a WorkerFailure the engine can act on instead of a hang.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


class WorkerFailure(RuntimeError):
    def __init__(self, rank: int, what: str, cause: BaseException | str) -> None:
        super().__init__(f"worker rank {rank} failed during {what}: {cause}")
        self.rank = rank
        self.what = what


@dataclass(frozen=True)
class Topology:
    """Ranks: dense workers first (stage-major, tensor-parallel rank minor), then attention
    workers. Rank 0 is the driver (it runs the scheduler) and the first dense worker."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    attention_workers: int = 0

    @property
    def num_dense(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def world_size(self) -> int:
        return self.num_dense + self.attention_workers

    def dense_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tensor_parallel_size + tp_rank

    def attention_rank(self, worker_id: int) -> int:
        """worker_id counts from 1 (0 means the local, dense worker in block tables)."""
        return self.num_dense + worker_id - 1

    def worker_id_of(self, rank: int) -> int:
        return rank - self.num_dense + 1

    def is_attention(self, rank: int) -> bool:
        return rank >= self.num_dense

    def stage_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tensor_parallel_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, init_method: str, backend: str, timeout_s: float) -> None:
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )


def default_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _wait(work, timeout_s: float, peer: int, what: str) -> None:
    try:
        work.wait(dt.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise WorkerFailure(peer, what, e) from None


def send_tensor(t: torch.Tensor, dst: int, tag: int = 0):
    """Asynchronous send; returns the work handle (keep `t` alive until it completes)."""
    return dist.isend(t.contiguous(), dst=dst, tag=tag)


def recv_tensor(buf: torch.Tensor, src: int, tag: int = 0):
    return dist.irecv(buf, src=src, tag=tag)


def wait(work, timeout_s: float, peer: int, what: str) -> None:
    _wait(work, timeout_s, peer, what)


def send_object(obj, dst: int, timeout_s: float, tag: int = 0, device: str = "cpu") -> None:
    """Pickle and send (size first). For step plans and stats; tensors go as tensors."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    if device != "cpu":
        data, size = data.to(device), size.to(device)
    try:
        w1 = dist.isend(size, dst=dst, tag=tag)
        w2 = dist.isend(data, dst=dst, tag=tag + 1)
    except RuntimeError as e:
        raise WorkerFailure(dst, "send", e) from None
    _wait(w1, timeout_s, dst, "send")
    _wait(w2, timeout_s, dst, "send")


def recv_object(src: int, timeout_s: float | None, tag: int = 0, device: str = "cpu"):
    """Receive a pickled object; timeout None waits for ever (an idle worker's loop)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    w = dist.irecv(size, src=src, tag=tag)
    if timeout_s is None:
        w.wait()
    else:
        _wait(w, timeout_s, src, "recv")
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    w = dist.irecv(data, src=src, tag=tag + 1)
    _wait(w, timeout_s or 3600.0, src, "recv")
    return pickle.loads(data.cpu().numpy().tobytes())


def env_rank() -> tuple[int, int] | None:
    """(rank, world_size) when started by torchrun (or another launcher that sets them)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None
