"""Process groups and point-to-point messages between the driver, dense and attention workers.

Every blocking wait has a timeout, and every failure names the peer, so a dead or hung
worker becomes a WorkerFailure the engine can act on instead of a hang.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import math
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
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


def default_backend(device: str, world_size: int | None = None) -> str:
    """NCCL needs one GPU per rank; with fewer GPUs than ranks (e.g. dense and attention
    roles sharing one card) the ranks talk over gloo, staging tensors through host memory."""
    if not device.startswith("cuda"):
        return "gloo"
    if world_size is not None and torch.cuda.device_count() < world_size:
        return "gloo"
    return "nccl"


def rank_device(device: str, backend: str, rank: int) -> str:
    """The device a rank computes on: its own GPU under NCCL, else the given device."""
    if device.startswith("cuda") and backend == "nccl":
        return f"cuda:{rank}"
    return device


def transport_device(device: str) -> str:
    """Where message buffers live: the GPU under NCCL, host memory under gloo."""
    if device.startswith("cuda") and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return "cpu"


class Waiter:
    """Waits on point-to-point requests with a deadline.

    gloo's own timeout (Work.wait(timeout)) closes every connection of the process when it
    fires, which would take healthy workers down with a hung one. So the wait itself runs
    on a helper thread per peer (no gloo deadline; the process group's timeout is set very
    long) and the caller gives up on its own deadline. A dead peer still fails at once:
    gloo raises when the connection closes. Requests abandoned after a timeout stay posted
    inside gloo, so their buffers are kept alive here."""

    def __init__(self) -> None:
        self._threads: dict[int, ThreadPoolExecutor] = {}
        self._abandoned: list = []

    def wait(self, work, timeout_s: float, peer: int, what: str, keep=None) -> None:
        if math.isinf(timeout_s):
            _blocking_wait(work, peer, what)
            return
        pool = self._threads.setdefault(peer, ThreadPoolExecutor(1, thread_name_prefix=f"fapool-wait-{peer}"))
        future = pool.submit(work.wait)
        try:
            future.result(timeout=timeout_s)
        except FuturesTimeout:
            self._abandoned.append((work, keep))
            raise WorkerFailure(peer, what, f"no answer within {timeout_s:g} s (hung?)") from None
        except RuntimeError as e:
            raise WorkerFailure(peer, what, e) from None

    def abandon(self, work, keep) -> None:
        """Give up on a request without waiting (its peer failed); keep its buffer alive."""
        self._abandoned.append((work, keep))

    def close(self) -> None:
        for pool in self._threads.values():
            pool.shutdown(wait=False, cancel_futures=True)


def _blocking_wait(work, peer: int, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise WorkerFailure(peer, what, e) from None


def send_tensor(t: torch.Tensor, dst: int, tag: int = 0):
    """Asynchronous send; returns the request (keep `t` alive until it completes)."""
    return dist.isend(t.contiguous(), dst=dst, tag=tag)


def recv_tensor(buf: torch.Tensor, src: int, tag: int = 0):
    return dist.irecv(buf, src=src, tag=tag)


def wait(work, peer: int, what: str) -> None:
    """Block until a request completes (no deadline)."""
    _blocking_wait(work, peer, what)


def send_object(obj, dst: int, waiter: Waiter | None, timeout_s: float = math.inf, tag: int = 0, device: str = "cpu") -> None:
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
    for w, buf in ((w1, size), (w2, data)):
        if waiter is None:
            _blocking_wait(w, dst, "send")
        else:
            waiter.wait(w, timeout_s, dst, "send", buf)


def recv_object(src: int, waiter: Waiter | None, timeout_s: float = math.inf, tag: int = 0, device: str = "cpu"):
    """Receive a pickled object (no waiter: block, e.g. an idle worker awaiting its next step)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    data = None
    for step in range(2):
        buf = size if step == 0 else data
        w = dist.irecv(buf, src=src, tag=tag + step)
        if waiter is None:
            _blocking_wait(w, src, "recv")
        else:
            waiter.wait(w, timeout_s, src, "recv", buf)
        if step == 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    return pickle.loads(data.cpu().numpy().tobytes())


def env_rank() -> tuple[int, int] | None:
    """(rank, world_size) when started by torchrun (or another launcher that sets them)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None
