"""Starting and stopping the ranks of a multi-rank engine, and what each rank runs.

The driver (rank 0, this process) spawns ranks 1..N-1 (or joins ranks torchrun started) and
sends each its role: AttentionInit makes an attention rank, DenseInit a dense rank, AFDInit an
attention or FFN rank of a disaggregated engine. With distributed_executor "ray" the ranks are
Ray actors (ray_ranks) running the same rank_main; only their start and rendezvous differ. The
ranks stop when the driver says so (shutdown), and in any case when the group is dropped
(the engine garbage-collected, the interpreter exiting): its finalizer kills what is left and
releases the process group, so a new engine can start one in the same process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from fapool.config import ConfigError, EngineConfig
from fapool.worker import comm
from fapool.worker.afd_worker import afd_rank_main
from fapool.worker.attention_worker import AttentionWorker
from fapool.worker.dense_worker import GROUP_TIMEOUT_S, dense_worker_main, tp_groups
from fapool.worker.protocol import SHUTDOWN, AFDInit, AttentionInit, Tag

logger = logging.getLogger(__name__)


class WorkerGroup:
    """Starts the non-driver ranks (or joins ranks torchrun started) and stops them."""

    def __init__(self, config: EngineConfig, world_size: int) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "this process already runs a multi-rank engine (attention pool or TP/PP): stop it first "
                "with llm.shutdown(), a `with LLM(...)` block, or by dropping it (del llm)"
            )
        self.world_size = world_size
        self.procs: dict[int, multiprocessing.Process] = {}  # or ray_ranks.RayRank, the same interface
        self.rank_devices = rank_devices(config, world_size)
        backend = self.rank_devices.backend
        if backend == "nccl":
            comm.disable_nvlink_multicast()
            # This process is rank 0: NCCL's own bookkeeping (barriers, communicators) uses
            # the current device, so make it the one rank 0 computes on.
            torch.cuda.set_device(torch.device(self.rank_devices.devices[0]))
        # Deadlines are the engine's (comm.Waiter); gloo's own timeout would close every
        # connection when it fires, so it is set out of the way.
        timeout = GROUP_TIMEOUT_S
        launched = comm.env_rank()
        if config.parallel.distributed_executor == "ray" and world_size > 1:
            if launched is not None:
                raise ConfigError("distributed_executor 'ray' starts the ranks as Ray actors: run without torchrun")
            from fapool.worker.ray_ranks import RayRanks  # Ray loads only for this executor

            ray_ranks = RayRanks(config, world_size, self.rank_devices, timeout, rank_main)
            self.procs = ray_ranks.procs
            self._reaper = weakref.finalize(self, _reap, self.procs, ray_ranks.release)
            self._rendezvous(ray_ranks.init_method, backend, timeout)
            return
        # Dropped without shutdown(): kill the ranks and release the process group.
        self._reaper = weakref.finalize(self, _reap, self.procs)
        if launched is not None:
            rank, world = launched
            if world != world_size or rank != 0:
                raise ValueError(f"torchrun started {world} ranks (this is {rank}); the engine needs {world_size}")
            comm.init_process_group(0, world_size, "env://", backend, timeout)
            return
        init_method = f"tcp://127.0.0.1:{comm.free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        for rank in range(1, world_size):
            p = ctx.Process(
                target=_spawned_rank_main,
                args=(rank, world_size, init_method, backend, self.rank_devices.devices[rank], timeout),
                daemon=True,
                name=f"fapool-worker-{rank}",
            )
            p.start()
            self.procs[rank] = p
        self._rendezvous(init_method, backend, timeout)

    def _rendezvous(self, init_method: str, backend: str, timeout: float) -> None:
        """Join the group, but fail fast (naming the rank) if a worker dies while starting,
        e.g. a script without the `if __name__ == "__main__":` guard that spawn needs."""
        errors: list[BaseException] = []

        def join() -> None:
            try:
                comm.init_process_group(0, self.world_size, init_method, backend, timeout)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            t.join(timeout=0.2)
            dead = [(r, p.exitcode) for r, p in self.procs.items() if p.exitcode is not None]
            if dead and t.is_alive():
                r, code = dead[0]
                # A Ray actor's error is not printed here (its log stays with Ray): name it.
                error = getattr(self.procs[r], "error", None)
                self.kill()
                why = error or "see its error above; scripts that start a pool need an `if __name__ == '__main__':` guard"
                raise RuntimeError(f"worker rank {r} exited with code {code} while starting ({why})")
        if errors:
            self.kill()
            raise RuntimeError(f"could not start the worker group: {errors[0]}") from errors[0]

    def alive(self, rank: int) -> bool:
        p = self.procs.get(rank)
        return p is None or p.is_alive()

    def kill(self) -> None:
        """Stop every rank at once and release the process group (after a failure: the
        survivors may be blocked in an exchange that will never complete)."""
        self._reaper()

    def shutdown(self, live_ranks: list[int], waiter: comm.Waiter, transport: str = "cpu") -> None:
        """Ask the live ranks to stop, wait for them (killing stragglers), release the group."""
        for rank in live_ranks:
            try:
                comm.send_object(SHUTDOWN, rank, waiter, timeout_s=5.0, tag=Tag.STEP, device=transport)
            except comm.WorkerFailure:
                pass
        for p in self.procs.values():
            p.join(timeout=10)
        self._reaper()


def rank_devices(config: EngineConfig, world_size: int) -> comm.RankDevices:
    """Backend and device of each rank: as Ray places its actors, or as this host's GPUs allow."""
    if config.parallel.distributed_executor == "ray" and world_size > 1:
        from fapool.worker.ray_ranks import rank_devices as ray_rank_devices

        return ray_rank_devices(config, world_size)
    return comm.engine_rank_devices(config.device, world_size)


def _reap(procs: dict[int, multiprocessing.Process], release: Callable[[], None] | None = None) -> None:
    for p in procs.values():
        if p.is_alive():
            p.kill()
    for p in procs.values():
        p.join(timeout=5)
    if dist.is_initialized():
        try:
            comm.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - best effort: the ranks are gone either way
            logger.warning("releasing the process group: %s", e)
    if release is not None:
        release()


def _spawned_rank_main(*args) -> None:
    """rank_main in a process this engine spawned. After a clean stop it leaves without the
    interpreter's teardown of torch (about a second per process), which the driver would
    otherwise wait out in shutdown(). An error still propagates (traceback, exit code 1)."""
    rank_main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave_cores_to_ranks(other_ranks: int) -> None:
    """The driver's CPU threads: the other ranks compute on one thread each (rank_main) and the
    driver keeps the remaining cores, since oversubscribed OpenMP threads spin against each
    other and stall every step."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - other_ranks)))


def rank_main(rank: int, world_size: int, init_method: str, backend: str, device: str, timeout_s: float) -> None:
    """Entry point of a non-driver rank (spawned, or started by torchrun): join the group,
    take the role the driver sends, serve until told to stop or the driver goes away."""
    torch.set_num_threads(1)
    if backend == "nccl":
        comm.disable_nvlink_multicast()  # spawned ranks inherit it; torchrun-started ones set it here
    if torch.device(device).index is not None:
        # NCCL's bookkeeping and CUDA events use the current device: make it this rank's own.
        torch.cuda.set_device(torch.device(device))
    comm.init_process_group(rank, world_size, init_method, backend, timeout_s)
    try:
        init = comm.recv_object(0, None, tag=Tag.INIT, device=comm.transport_device(device))
        if isinstance(init, AttentionInit):
            par = init.config.parallel
            if par.tensor_parallel_size > 1:
                # Next to tensor-parallel dense ranks: torch.distributed wants every rank to
                # create every group, members or not.
                topology = comm.Topology(par.tensor_parallel_size, 1, init.config.pool.attention_workers)
                tp_groups(topology, GROUP_TIMEOUT_S)
            AttentionWorker(init, rank, device).run()
        elif isinstance(init, AFDInit):
            afd_rank_main(init, rank, device)
        else:
            dense_worker_main(init, rank, device)
    except comm.WorkerFailure as e:
        # The driver went away: nothing left to serve.
        logger.warning("rank %d stopping: %s", rank, e)
    finally:
        try:
            comm.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
