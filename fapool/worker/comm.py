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
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fapool.worker.local_transport import LOCAL_WORK, LocalTransport, PeerLost


class WorkerFailure(RuntimeError):
    def __init__(self, rank: int | Peer, what: str, cause: BaseException | str) -> None:
        who = f"worker rank {rank}" if isinstance(rank, int) else str(rank)
        super().__init__(f"{who} failed during {what}: {cause}")
        self.rank = rank
        self.what = what


def blame_rank(procs: dict, error: BaseException, grace_s: float = 0.5) -> tuple[int, str] | None:
    """The rank behind a failed step and why: one that exited (a killed one before those that
    stopped because a peer vanished), else the rank the failed wait was on; None when no rank
    in `procs` (rank -> process) is implicated. A peer's socket can reset before its process is
    reaped, and its neighbours exit on the reset, so an implicated failure waits up to `grace_s`
    for a killed rank to show."""
    implicated = isinstance(error, WorkerFailure) and error.rank in procs
    deadline = time.monotonic() + (grace_s if implicated else 0.0)
    while True:
        dead = {r: p.exitcode for r, p in procs.items() if not p.is_alive()}
        killed = any((code or 0) < 0 for code in dead.values())
        if killed or (dead and not implicated) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if dead:
        rank = min(dead, key=lambda r: (not (dead[r] or 0) < 0, r))
        others = sorted(set(dead) - {rank})
        return rank, f"exited with code {dead[rank]}" + (f" (ranks {others} stopped too)" if others else "")
    if implicated:
        return error.rank, f"failed: {error}"
    return None


@dataclass(frozen=True, eq=False)
class Peer:
    """A process reached through a process group of its own (an elastic pool worker's pair
    group, made when it joins), not through the default group: `rank` is its rank there.
    Every send/recv here takes a Peer wherever it takes a rank."""

    group: object  # a torch ProcessGroup (ProcessGroupGloo)
    rank: int
    name: str

    def __str__(self) -> str:
        return self.name


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


# The process's same-host transport, beside torch.distributed's default group (which is
# process-wide state too): set up with the group, used by every message to a default-group rank.
_local: LocalTransport | None = None


def init_process_group(rank: int, world_size: int, init_method: str, backend: str, timeout_s: float) -> None:
    """Join the default group. With gloo and every rank on this host, messages and sums go
    over Unix-domain sockets instead of gloo's TCP pairs."""
    global _local
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )
    name = _one_host_world_name(init_method)
    if name is not None and backend == "gloo" and world_size > 1:
        _local = LocalTransport(rank, world_size, name)


def _one_host_world_name(init_method: str) -> str | None:
    """A name unique to this group among the host's groups (its rendezvous port), when every
    rank runs on this host: spawned by this engine, or a one-node torchrun."""
    if init_method.startswith("tcp://127.0.0.1:"):
        return init_method.rsplit(":", 1)[1]
    if init_method == "env://" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        return os.environ.get("MASTER_PORT")
    return None


def transport_name() -> str | None:
    """What the default group's messages travel over: "unix" (this host's sockets), "gloo"
    or "nccl"; None outside a multi-rank engine."""
    if _local is not None:
        return "unix"
    return dist.get_backend() if dist.is_initialized() else None


def destroy_process_group() -> None:
    global _local
    if _local is not None:
        _local.close()
        _local = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, group):
    """Start an in-place sum of `t` over `group`; returns the request to wait on."""
    if _local is not None:
        return _local.all_reduce(t, dist.get_process_group_ranks(group))
    return dist.all_reduce(t, group=group, async_op=True)


@dataclass(frozen=True)
class RankDevices:
    """Which backend the ranks talk over and which device each rank computes on."""

    backend: str  # "nccl" | "gloo"
    devices: tuple[str, ...]  # rank -> device

    @property
    def staged(self) -> bool:
        """CUDA tensors over gloo: messages and all-reduces go through host memory."""
        return self.backend == "gloo" and self.devices[0].startswith("cuda")

    def ranks_sharing(self, rank: int) -> int:
        """How many ranks compute on this rank's device (they split its memory)."""
        return self.devices.count(self.devices[rank])


def place_ranks(device: str, world_size: int, device_count: int, local_world_size: int | None = None) -> RankDevices:
    """The one rule for every role (attention workers, TP/PP dense ranks, both together).

    CPU: gloo, every rank on the CPU. CUDA with a GPU for each rank of a host
    (`local_world_size`, default the whole world; torchrun's LOCAL_WORLD_SIZE across hosts):
    NCCL, rank r on cuda:(base + r % local) % device_count, base being the given device's
    index (0 for "cuda"). One process per GPU is what NCCL needs (it refuses two ranks on one
    device), and ranks in topology order (dense stage-major, TP rank minor, then attention
    workers) put a stage's TP ranks on consecutive GPUs, the all-reduce partners, which on
    hosts whose GPUs pair up by index are the linked ones. Fewer GPUs than ranks (e.g. the
    roles sharing one card): gloo, every rank on the given device, tensors staged through
    host memory."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not device.startswith("cuda"):
        return RankDevices("gloo", (device,) * world_size)
    local = local_world_size or world_size
    if device_count < local:
        return RankDevices("gloo", (device,) * world_size)
    base = torch.device(device).index or 0
    return RankDevices("nccl", tuple(f"cuda:{(base + r % local) % device_count}" for r in range(world_size)))


def engine_rank_devices(device: str, world_size: int) -> RankDevices:
    """place_ranks for this host: its GPU count, and under torchrun its ranks per host."""
    count = torch.cuda.device_count() if device.startswith("cuda") else 0
    local = os.environ.get("LOCAL_WORLD_SIZE") if env_rank() is not None else None
    return place_ranks(device, world_size, count, int(local) if local else None)


def disable_nvlink_multicast() -> None:
    """NVLink multicast (NVLS) off unless the caller chose otherwise: the machines this runs
    on require it off (a program using it can put a host's shared GPUs out of service).
    Spawned ranks inherit the environment; set before the first NCCL communicator."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


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

    def wait(self, work, timeout_s: float, peer: int | Peer, what: str, keep=None) -> None:
        if isinstance(work, LOCAL_WORK):  # waits on its own thread, with its own deadline
            _wait_local(work, timeout_s, peer, what)
            return
        if math.isinf(timeout_s) or (isinstance(keep, torch.Tensor) and keep.is_cuda):
            # A CUDA buffer means NCCL, whose wait() does not block the host: it makes the
            # calling thread's current stream wait for the transfer. So it must run on this
            # thread (a helper's current stream is another one, and would order nothing).
            # No host-side deadline then: a peer that dies fails the transfer in NCCL, one
            # that hangs is bounded by the process group's timeout, not by timeout_s.
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


def _wait_local(work, timeout_s: float, peer: int | Peer, what: str) -> None:
    try:
        work.wait(timeout_s)
    except TimeoutError:
        raise WorkerFailure(peer, what, f"no answer within {timeout_s:g} s (hung?)") from None
    except (PeerLost, OSError) as e:
        raise WorkerFailure(peer, what, e) from None


def _blocking_wait(work, peer: int | Peer, what: str) -> None:
    try:  # gloo's and the same-host transport's failures are RuntimeErrors alike
        work.wait()
    except RuntimeError as e:
        raise WorkerFailure(peer, what, e) from None


# Tests: a folder where every process appends its point-to-point posts, in order, to
# rank<r>.txt. NCCL ignores tags and runs a pair's sends and receives in posting order on one
# stream, so each pair's two lists must mirror each other (tests/p2p_order.py checks it on
# gloo, where tags would otherwise hide a mismatch that deadlocks under NCCL).
TRACE_ENV = "FAPOOL_P2P_TRACE"


def _trace(op: str, peer: int, t: torch.Tensor) -> None:
    folder = os.environ.get(TRACE_ENV)
    if folder:
        with open(os.path.join(folder, f"rank{dist.get_rank()}.txt"), "a") as f:
            f.write(f"{op} {peer} {t.numel()} {t.dtype}\n")


def send_tensor(t: torch.Tensor, dst: int | Peer, tag: int = 0):
    """Asynchronous send; returns the request (keep `t` alive until it completes)."""
    t = t.contiguous()
    if isinstance(dst, Peer):
        return dst.group.send([t], dst.rank, tag)
    _trace("send", dst, t)
    if _local is not None:
        try:
            return _local.send(t, dst, tag)
        except PeerLost as e:  # the peer's socket is gone already: fail as a wait on it would
            raise WorkerFailure(dst, "send", e) from None
    return dist.isend(t, dst=dst, tag=tag)


def recv_tensor(buf: torch.Tensor, src: int | Peer, tag: int = 0):
    if isinstance(src, Peer):
        return src.group.recv([buf], src.rank, tag)
    _trace("recv", src, buf)
    if _local is not None:
        return _local.recv(buf, src, tag)
    return dist.irecv(buf, src=src, tag=tag)


def wait(work, peer: int | Peer, what: str) -> None:
    """Block until a request completes (no deadline)."""
    _blocking_wait(work, peer, what)


def send_object(obj, dst: int | Peer, waiter: Waiter | None, timeout_s: float = math.inf, tag: int = 0, device: str = "cpu") -> None:
    """Pickle and send (size first). For step plans and stats; tensors go as tensors."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    if device != "cpu":
        data, size = data.to(device), size.to(device)
    try:
        w1 = send_tensor(size, dst, tag)
        w2 = send_tensor(data, dst, tag + 1)
    except RuntimeError as e:
        raise WorkerFailure(dst, "send", e) from None
    for w, buf in ((w1, size), (w2, data)):
        if waiter is None:
            _blocking_wait(w, dst, "send")
        else:
            waiter.wait(w, timeout_s, dst, "send", buf)


def recv_object(src: int | Peer, waiter: Waiter | None, timeout_s: float = math.inf, tag: int = 0, device: str = "cpu"):
    """Receive a pickled object (no waiter: block, e.g. an idle worker awaiting its next step)."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    data = None
    for step in range(2):
        buf = size if step == 0 else data
        w = recv_tensor(buf, src, tag + step)
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
