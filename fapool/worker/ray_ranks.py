"""The ranks of a multi-rank engine as Ray actors (distributed_executor "ray"): AFD's attention
and FFN ranks, pipeline stages, tensor-parallel ranks. Only how the rank processes start and
find each other changes; each actor runs launcher.rank_main, the same role code and wire
protocol as a spawned process.

Control plane (Ray): create one actor per rank (1 CPU, and a GPU of its own on CUDA), learn
where Ray placed it, hand it its rank and the rendezvous address, watch whether it still runs.
Data plane (torch.distributed): the driver and the actors join one default process group at
start, gloo on CPU (over this host's Unix-domain sockets when every actor runs here) and NCCL
on GPUs; no tensor or step plan ever travels as a Ray object.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable

import ray
import torch

from fapool.config import ConfigError, EngineConfig
from fapool.worker import comm

# launcher.rank_main: (rank, world_size, init_method, backend, device, timeout_s)
RankMain = Callable[[int, int, str, str, str, float], None]

logger = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 120.0  # an actor Ray has not started by then: the cluster lacks the CPU/GPU for it


def connect(address: str | None, hide_device: str | None = None) -> bool:
    """Join the Ray cluster at `address` (None: start a local one, dashboard off); True when this
    call started or joined it (the caller then disconnects), False when Ray was already up.
    `hide_device`: the driver's CUDA device, kept out of a local Ray this starts, so that no
    actor is given the GPU the driver computes on (NCCL needs one process per GPU)."""
    if ray.is_initialized():
        return False
    check_reachable(address)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if address is None and hide_device is not None:
        # A local Ray learns its GPUs from this variable at start (torch here has its own already).
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(g for g in _visible_gpus() if g != _physical_gpu(hide_device))
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"ray_address {address!r}: no Ray cluster reachable there ({e})") from None
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return True


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A host:port address must accept a connection: ray.init retries an unreachable one forever."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ConfigError(f"ray_address {address!r}: no Ray cluster reachable there ({e})") from None


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in env.split(",") if g] if env is not None else [str(i) for i in range(torch.cuda.device_count())]


def _physical_gpu(device: str) -> str:
    """The host's id (as CUDA_VISIBLE_DEVICES and Ray name it) of this process's CUDA device."""
    index = torch.device(device).index
    visible = _visible_gpus()
    return visible[index if index is not None else torch.cuda.current_device()]


def rank_devices(config: EngineConfig, world_size: int) -> comm.RankDevices:
    """Backend and device of each rank when ranks 1.. are Ray actors: every actor on the CPU
    (gloo), or on CUDA on a GPU of its own, the one Ray gives it ("cuda" inside the actor), over
    NCCL. The driver's entry carries its index, so no actor counts as sharing its device."""
    if not config.device.startswith("cuda"):
        return comm.place_ranks(config.device, world_size, 0)
    index = torch.device(config.device).index
    driver = f"cuda:{index if index is not None else torch.cuda.current_device()}"
    return comm.RankDevices("nccl", (driver,) + ("cuda",) * (world_size - 1))


@ray.remote
class RankActor:
    """One rank of the engine in a Ray actor."""

    def place(self) -> tuple[str, str, list[str], int]:
        """(node IP, node id, GPU ids, pid): where Ray started this actor."""
        node = ray.get_runtime_context().get_node_id()
        return ray.util.get_node_ip_address(), node, [str(g) for g in ray.get_gpu_ids()], os.getpid()

    def serve(
        self, main: RankMain, rank: int, world_size: int, init_method: str, backend: str, device: str, timeout_s: float
    ) -> int:
        """Join the group, take the role the driver sends and serve until told to stop (`main`:
        the launcher's rank_main, passed in so this module does not import the launcher)."""
        main(rank, world_size, init_method, backend, device, timeout_s)
        return 0


class RayRank:
    """A rank's actor seen as the launcher sees a spawned process (is_alive, exitcode, kill,
    join), so failure diagnosis and shutdown are the multiprocess executor's. Its liveness is
    whether its `serve` call is still running: a local check on the call's result, no round
    trip to the actor."""

    def __init__(self, actor, ref, pid: int) -> None:
        self.actor = actor
        self.ref = ref  # serve's result: ready when the rank stopped, an error when its actor died
        self.pid = pid
        self._exitcode: int | None = None
        self.error: str | None = None  # why the rank stopped, when it failed

    @property
    def exitcode(self) -> int | None:
        """None while serving; 0 after a clean stop, 1 after an error, -SIGKILL once killed."""
        if self._exitcode is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                ray.get(self.ref)
                self._exitcode = 0
            except ray.exceptions.RayActorError as e:
                self._exitcode, self.error = -signal.SIGKILL, f"its Ray actor died: {e}"
            except ray.exceptions.RayTaskError as e:  # rank_main raised: its own exception
                cause = getattr(e, "cause", None) or e
                self._exitcode, self.error = 1, f"{type(cause).__name__}: {cause}"
            except ray.exceptions.RayError as e:
                self._exitcode, self.error = 1, str(e)
        return self._exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)
        if self._exitcode is None:
            self._exitcode = -signal.SIGKILL

    def join(self, timeout: float | None = None) -> None:
        if self._exitcode is None:
            ray.wait([self.ref], timeout=timeout)


class RayRanks:
    """Ranks 1..world_size-1 as Ray actors. `procs` (rank -> RayRank) and `init_method` are what
    the launcher needs; release() stops every actor (and the Ray this started)."""

    def __init__(
        self, config: EngineConfig, world_size: int, devices: comm.RankDevices, timeout_s: float, main: RankMain
    ) -> None:
        self._main = main
        on_gpu = config.device.startswith("cuda")
        self.started = connect(config.parallel.ray_address, config.device if on_gpu else None)
        self.procs: dict[int, RayRank] = {}
        self._actors = []
        try:
            self._start(world_size, devices, timeout_s, on_gpu)
        except BaseException:
            self.release()
            raise

    def _start(self, world_size: int, devices: comm.RankDevices, timeout_s: float, on_gpu: bool) -> None:
        ranks = range(1, world_size)
        self._actors = [
            RankActor.options(num_cpus=1, num_gpus=1 if on_gpu else 0).remote() for _ in ranks
        ]
        try:
            places = ray.get([a.place.remote() for a in self._actors], timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            need = f"1 CPU{' and 1 GPU' if on_gpu else ''} each"
            raise RuntimeError(
                f"Ray did not start the {len(ranks)} rank actors within {PLACE_TIMEOUT_S:g} s: "
                f"the cluster lacks free resources for them ({need})"
            ) from None
        node = ray.get_runtime_context().get_node_id()
        if on_gpu:
            driver_device = devices.devices[0]
            driver_gpu = _physical_gpu(driver_device)
            for rank, (_, actor_node, gpus, _) in zip(ranks, places):
                if actor_node == node and driver_gpu in gpus:
                    raise RuntimeError(
                        f"Ray gave rank {rank} the driver's GPU ({driver_device}, id {driver_gpu}), and NCCL needs "
                        "a GPU per rank: start the Ray cluster without it (CUDA_VISIBLE_DEVICES) or run the "
                        "driver on a GPU Ray does not hand out"
                    )
        # Every actor on this host: the loopback address, which also lets gloo ranks use the
        # host's Unix-domain sockets (comm.init_process_group); else the driver's node address.
        one_host = all(actor_node == node for _, actor_node, _, _ in places)
        host = "127.0.0.1" if one_host else ray.util.get_node_ip_address()
        self.init_method = f"tcp://{host}:{comm.free_port()}"
        for rank, actor, (ip, _, gpus, pid) in zip(ranks, self._actors, places):
            ref = actor.serve.remote(
                self._main,
                rank, world_size, self.init_method, devices.backend, devices.devices[rank], timeout_s
            )
            self.procs[rank] = RayRank(actor, ref, pid)
            logger.info("rank %d: Ray actor on %s (pid %d%s)", rank, ip, pid, f", GPU {gpus}" if gpus else "")

    def release(self) -> None:
        """Kill every rank's actor (a stopped rank's actor would otherwise hold its CPU or GPU)
        and disconnect from a Ray this started."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
            self.started = False
