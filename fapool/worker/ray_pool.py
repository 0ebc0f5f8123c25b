"""An elastic attention pool on Ray (seed 000's resource manager, which activates workers as
sequences grow and releases them): each attention worker is a Ray actor, started when the
pool places KV on it and stopped after `pool_idle_timeout_s` holding none, its memory (and
GPU) going back to Ray. With `ray_address` the actors may live on other hosts of the cluster.

Control plane: the actor is created, and handed its AttentionInit, through Ray. Data plane:
the driver and the actor then make a process group of their own (gloo over TCP; rendezvous
through a TCPStore the driver hosts) and every step plan, q/k/v message, partial and report
goes through it, in the wire protocol of the multiprocess executor's workers (comm.Peer),
never as a Ray object. With pipeline stages each later stage's leader (TP rank 0) exchanges
with the pool for its own layers, as beside worker processes: it learns of each join from a
key the driver sets in the store (StagePairs) and makes a pair group of its own with the
worker, which joins the driver's first, then the leaders' in stage order. A worker that joins
mid-generation serves the segments placed on it from then on; a killed actor fails its pair
groups' transfers, and its requests are recomputed, as with a dead worker process.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from fapool.config import EngineConfig
from fapool.worker import comm
from fapool.worker.attention_worker import AttentionWorker
from fapool.worker.protocol import SHUTDOWN, AttentionInit, Tag
from fapool.worker.ray_ranks import connect

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0  # an actor that has not joined by then (no free CPU/GPU in the cluster) fails the step
PAIR_TIMEOUT = dt.timedelta(days=7)  # deadlines are comm.Waiter's; gloo's own would close the pair


@ray.remote
class PoolWorkerActor:
    """One attention worker in a Ray actor: joins the driver's pair group, then serves steps on
    a thread until the driver says stop (or goes away)."""

    def start(
        self, init: AttentionInit, host: str, port: int, prefix: str, device: str, leaders: list[int]
    ) -> int:
        """Join the driver's pair group, then each stage leader's (`leaders`: their ranks);
        returns once every group is up, so a step the driver plans after the join reaches
        every stage's end."""
        torch.set_num_threads(1)
        store = _client(host, port, JOIN_TIMEOUT_S)
        peers = {0: comm.Peer(_pair_group(store, prefix, 1), 0, "the driver")}
        for r in leaders:
            group = _pair_group(store, _leader_prefix(prefix, r), 1)
            peers[r] = comm.Peer(group, 0, f"stage leader rank {r}")
        worker = AttentionWorker(init, init.worker_id, device, peers=peers)
        self._thread = threading.Thread(target=self._serve, args=(worker,), daemon=True)
        self._thread.start()
        return os.getpid()

    @staticmethod
    def _serve(worker: AttentionWorker) -> None:
        try:
            worker.run()
        except comm.WorkerFailure as e:
            logger.warning("Ray attention worker %d stopping: %s", worker.init.worker_id, e)


@dataclass
class _Live:
    actor: object  # the actor handle
    peer: comm.Peer
    pid: int


@dataclass
class _Joining:
    actor: object
    future: Future  # -> (pair group, pid, seconds from the start to the join)


class RayPool:
    """The driver's side: which workers are running, starting and stopping them. Joins run on
    one background thread (it alone uses the rendezvous store), so a worker started ahead joins
    while steps go on; a step that needs a worker still joining waits for it."""

    def __init__(
        self, config: EngineConfig, kv_heads: dict[int, list[int]], num_blocks: int, link, leaders: list[int]
    ) -> None:
        self.config = config
        self.kv_heads = kv_heads
        self.num_blocks = num_blocks
        self.link = link  # PoolLink: a joining worker's Peer goes into link.peers
        self.leaders = leaders  # the later pipeline stages' leaders: each pairs with every worker too
        self.idle_timeout_s = config.pool.pool_idle_timeout_s
        self.started_ray = connect(config.parallel.ray_address)
        self.host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(
            self.host, 0, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=JOIN_TIMEOUT_S)
        )
        # A store client serves one call at a time, and a join's rendezvous blocks in it: joins
        # are announced to the stage leaders through a client of their own.
        self._announce = _client(self.host, self.store.port, JOIN_TIMEOUT_S) if leaders else None
        self.live: dict[int, _Live] = {}
        self.joining: dict[int, _Joining] = {}
        # A daemon thread: a join still waiting when the engine shuts down must not hold up exit.
        self._joins: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._join_loop, daemon=True, name="fapool-ray-join").start()
        self.join_seconds: list[float] = []  # from asking Ray for an actor to its first message
        self.join_wait_seconds: list[float] = []  # how long a step waited for a join (0: hidden)
        self.num_stopped = 0
        self.num_started_on_demand = 0  # starts a step asked for (not ahead of need)
        self.pids_seen: set[int] = set()  # every actor process that joined (tests: gone once stopped)
        self._idle_since: dict[int, float] = {}
        self._generation = itertools.count()

    @property
    def num_live(self) -> int:
        return len(self.live)

    def ensure(self, workers: Iterable[int]) -> None:
        """Make the workers a step needs live: start those not running or joining yet (all at
        once) and wait for each join."""
        needed = sorted(w for w in set(workers) if w not in self.live and self.link.live(w))
        if not needed:
            return
        self.num_started_on_demand += sum(w not in self.joining for w in needed)
        self._start(needed)
        t0 = time.perf_counter()
        for w in needed:
            self._settle(w, wait=True)
        self.join_wait_seconds.append(time.perf_counter() - t0)

    def resize(self, active: set[int], soon: set[int]) -> None:
        """Between steps: register finished joins, start the workers wanted soon, and stop the
        others that held no KV for idle_timeout_s (`active`: workers holding some now)."""
        self._settle_finished()
        self._start(sorted(w for w in soon if w not in self.live and self.link.live(w)))
        self.release_idle(active | soon)

    def _start(self, workers: list[int]) -> None:
        on_gpu = self.config.device.startswith("cuda")
        for w in workers:
            if w in self.joining:
                continue
            generation = next(self._generation)
            prefix = f"pool/{w}/{generation}"
            if self.leaders:  # StagePairs on each leader reads the joins in this order
                self._announce.set(_join_key(generation), f"{w} {prefix}")
            actor = PoolWorkerActor.options(num_cpus=1, num_gpus=1 if on_gpu else 0).remote()
            init = AttentionInit(self.config, w, self.num_blocks, self.kv_heads[w])
            device = "cuda" if on_gpu else "cpu"
            ref = actor.start.remote(init, self.host, self.store.port, prefix, device, self.leaders)
            future: Future = Future()
            self._joins.put((prefix, ref, time.perf_counter(), future))
            self.joining[w] = _Joining(actor, future)

    def _join_loop(self) -> None:
        while (job := self._joins.get()) is not None:
            prefix, ref, t0, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                group = _pair_group(self.store, prefix, 0)
                (pid,) = ray.get([ref], timeout=JOIN_TIMEOUT_S)
                future.set_result((group, pid, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - handed to the step that needs the worker
                future.set_exception(e)

    def _settle_finished(self) -> None:
        for w in [w for w, j in self.joining.items() if j.future.done()]:
            self._settle(w, wait=False)

    def _settle(self, w: int, wait: bool) -> None:
        joining = self.joining.pop(w)
        try:
            group, pid, seconds = joining.future.result(timeout=JOIN_TIMEOUT_S if wait else 0)
        except Exception as e:  # noqa: BLE001 - Ray's and gloo's errors alike: the worker is lost
            ray.kill(joining.actor, no_restart=True)
            self.link.fail(w, f"could not start a Ray attention worker: {e}")
            return
        peer = comm.Peer(group, 1, f"Ray attention worker {w}")
        self.live[w] = _Live(joining.actor, peer, pid)
        self.pids_seen.add(pid)
        self.link.peers[w] = peer
        self.join_seconds.append(seconds)
        logger.info("attention worker %d joined (Ray actor, pid %d) in %.2f s", w, pid, seconds)

    def release_idle(self, active: set[int], now: float | None = None) -> None:
        """Stop workers that held no KV for idle_timeout_s (`active`: workers holding some now)."""
        now = time.monotonic() if now is None else now
        for w in list(self.live):
            if w in active or not self.link.live(w):
                self._idle_since.pop(w, None)
                if not self.link.live(w):  # failed: its actor is gone or useless
                    self._drop(w, graceful=False)
                continue
            since = self._idle_since.setdefault(w, now)
            if self.idle_timeout_s is not None and now - since >= self.idle_timeout_s:
                self._drop(w, graceful=True)

    def _drop(self, w: int, graceful: bool) -> None:
        live = self.live.pop(w)
        self._idle_since.pop(w, None)
        if graceful:
            try:
                comm.send_object(SHUTDOWN, live.peer, self.link.waiter, 5.0, tag=Tag.STEP)
            except comm.WorkerFailure:
                pass
        ray.kill(live.actor, no_restart=True)
        self.num_stopped += 1
        logger.info("attention worker %d stopped (Ray actor, pid %d)", w, live.pid)

    def shutdown(self) -> None:
        self._settle_finished()
        for joining in self.joining.values():  # still joining: never to be used
            joining.future.cancel()
            ray.kill(joining.actor, no_restart=True)
        self.joining.clear()
        self._joins.put(None)
        for w in list(self.live):
            self._drop(w, graceful=self.link.live(w))
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


class StagePairs:
    """A later pipeline stage's leader's side of the joins: a thread reads each join from the
    driver's store as the driver announces it and makes this rank's pair group with the
    worker (one thread per join, so a worker that never comes holds up no other). The Peer is
    a Future in link.joins until then; PoolLink.begin_step waits for it before a step that
    routes work to that worker, which the driver plans only once the worker has joined every
    leader (PoolWorkerActor.start), so the Future is in place by then."""

    def __init__(self, link, host: str, port: int, rank: int) -> None:
        self.link = link
        self.rank = rank
        self.host, self.port = host, port
        threading.Thread(target=self._watch, daemon=True, name="fapool-stage-joins").start()

    def _watch(self) -> None:
        # Its own store client, blocked between joins (a client serves one call at a time).
        store = _client(self.host, self.port, PAIR_TIMEOUT.total_seconds())
        for generation in itertools.count():
            while True:
                try:
                    w, prefix = store.get(_join_key(generation)).decode().split()
                    break
                except dist.DistStoreError:  # no join within the client's timeout: keep waiting
                    continue
                except Exception:  # noqa: BLE001 - the driver (its store) is gone: no more joins
                    return
            future: Future = Future()
            self.link.joins[int(w)] = future
            threading.Thread(target=self._pair, args=(int(w), prefix, future), daemon=True).start()

    def _pair(self, w: int, prefix: str, future: Future) -> None:
        try:
            store = _client(self.host, self.port, JOIN_TIMEOUT_S)
            group = _pair_group(store, _leader_prefix(prefix, self.rank), 0)
            future.set_result(comm.Peer(group, 1, f"Ray attention worker {w}"))
        except Exception as e:  # noqa: BLE001 - handed to the step that needs the worker
            future.set_exception(e)


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=dt.timedelta(seconds=timeout_s))


def _join_key(generation: int) -> str:
    return f"pool/join/{generation}"


def _leader_prefix(prefix: str, rank: int) -> str:
    return f"{prefix}/stage-leader-{rank}"


def _pair_group(store: dist.TCPStore, prefix: str, rank: int):
    """One end of a pair group (the dense rank is 0, the worker 1); returns once both ends
    have connected."""
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, PAIR_TIMEOUT)
