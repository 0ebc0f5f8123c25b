"""The executor: the one interface through which the engine runs steps, whatever the topology.

    Executor.execute(SchedulerOutput) -> (logits of due rows, due requests)   synchronous step
    Executor.launch(SchedulerOutput)  -> PendingTokens                        async scheduling
    Executor.launch_forward / launch_sample                                   the same in two halves,
                                          logits editable between them (penalties, grammar masks)
    Executor.take_failures()          -> attention workers lost since the last call
    Executor.live_pool_workers()      -> attention-pool worker processes alive now
    Executor.reports                  -> one StepReport per multi-rank step (the breakdown)
    Executor.shutdown()

`create_executor` picks the implementation from the config: in-process (one rank, today's
single runner) or multiprocess (the driver is rank 0 and spawns the other ranks on this host,
joins the ranks torchrun started across hosts, or, with distributed_executor "ray", starts them
as Ray actors): the attention pool, TP and PP, or attention-FFN disaggregation. The engine
never asks which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.attention.backend import AttentionBackend
from fapool.config import EngineConfig
from fapool.core.scheduler import ScheduledRequest, SchedulerOutput
from fapool.worker import comm
from fapool.worker.afd_runner import AFDRunner
from fapool.worker.model_runner import LaunchedForward, ModelRunner, PendingTokens
from fapool.worker.multi_rank_runner import MultiRankRunner
from fapool.worker.protocol import StepReport


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int  # blocks of the dense side (every dense rank uses the same ids)
    pool_blocks_per_worker: int | None  # None without an attention pool
    partitions: int = 1  # equal ranges of block ids on different ranks (AFD attention ranks)


class Executor:
    """Runs steps on one or more ranks. Subclasses wrap the rank-0 runner of a topology."""

    supports_async = False
    # launch in two halves (launch_forward, launch_sample), the logits editable between them
    supports_split_launch = False
    supports_prompt_logprobs = False  # every prompt position's logits (ModelRunner.execute)
    elastic_pool = False  # pool workers start and stop with demand (resize_pool does something)

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def initialize_kv_cache(self) -> KVLayout:
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        return KVLayout(num_blocks, self.runner.worker_num_blocks)

    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledRequest]]:
        return self.runner.execute(out)

    def launch(self, out: SchedulerOutput) -> PendingTokens:
        if not self.supports_async:
            raise RuntimeError(f"{type(self).__name__} steps synchronously: launch() needs supports_async")
        return self.runner.launch(out)

    def launch_forward(self, out: SchedulerOutput) -> LaunchedForward:
        if not self.supports_split_launch:
            raise RuntimeError(f"{type(self).__name__} cannot launch a step in halves")
        return self.runner.launch_forward(out)

    def launch_sample(self, fwd: LaunchedForward, edited: bool) -> PendingTokens:
        return self.runner.launch_sample(fwd, edited)

    def tokens_in_flight(self) -> tuple[torch.Tensor | None, dict[str, int]]:
        return self.runner.tokens_in_flight()

    def take_failures(self) -> list[tuple[int, str]]:
        return []

    def live_pool_workers(self) -> int:
        """Attention-pool worker processes alive now."""
        return 0

    def resize_pool(self, active_workers: set[int], soon: set[int]) -> None:
        """After a step: the pool workers holding KV now and those running sequences will reach
        soon (an elastic pool starts the latter ahead and stops the idle rest)."""

    def pool_events(self) -> tuple[int, int, list[float], float]:
        """(workers started, workers stopped, each start's join latency in s, seconds steps waited
        for joins): an elastic pool's."""
        return 0, 0, [], 0.0

    @property
    def reports(self) -> list[StepReport]:
        return []

    def shutdown(self) -> None:
        pass


class InProcessExecutor(Executor):
    """One process, one device: decode steps through CUDA graphs and async scheduling on GPU."""

    supports_async = True
    supports_split_launch = True
    supports_prompt_logprobs = True


class MultiprocessExecutor(Executor):
    """Rank 0 of a multi-rank topology (attention pool, TP, PP, TP + pool); the other ranks are
    processes it spawned on this host or that torchrun started."""

    runner: MultiRankRunner
    supports_async = True

    def take_failures(self) -> list[tuple[int, str]]:
        return self.runner.take_failures()

    def live_pool_workers(self) -> int:
        return self.runner.live_pool_workers()

    @property
    def reports(self) -> list[StepReport]:
        return self.runner.step_stats

    @property
    def world_size(self) -> int:
        return self.runner.topology.world_size

    @property
    def rank_devices(self):
        return self.runner.rank_devices

    def shutdown(self) -> None:
        self.runner.shutdown()


class AFDExecutor(MultiprocessExecutor):
    """Attention-FFN disaggregation (seed 002): rank 0 is attention rank 0; each attention rank
    holds one partition of the block ids."""

    runner: AFDRunner

    def initialize_kv_cache(self) -> KVLayout:
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        return KVLayout(num_blocks, None, self.runner.topology.attention_ranks)

    def live_pool_workers(self) -> int:
        return 0  # no attention pool: its attention ranks are fixed


class RayPoolExecutor(MultiprocessExecutor):
    """The attention pool with its workers as Ray actors, started as it grows and stopped when
    idle (worker/ray_pool). Steps run synchronously: workers start and stop between steps."""

    supports_async = False
    elastic_pool = True

    def resize_pool(self, active_workers: set[int], soon: set[int]) -> None:
        self.runner.ray_pool.resize(active_workers, soon)

    def pool_events(self) -> tuple[int, int, list[float], float]:
        pool = self.runner.ray_pool
        return len(pool.join_seconds), pool.num_stopped, list(pool.join_seconds), sum(pool.join_wait_seconds)


def create_executor(config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend) -> Executor:
    if config.parallel.distributed_executor == "ray" and config.pool.attention_workers:
        return RayPoolExecutor(MultiRankRunner(config, model, backend))
    if config.parallel.afd:
        return AFDExecutor(AFDRunner(config, model, backend))
    if comm.Topology(
        config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size, config.pool.attention_workers
    ).world_size > 1:
        return MultiprocessExecutor(MultiRankRunner(config, model, backend))
    return InProcessExecutor(ModelRunner(config, model, backend))

