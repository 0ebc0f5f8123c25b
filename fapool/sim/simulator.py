"""Discrete-event simulator of a cluster serving a request stream: events are whole batch steps of one
instance (FCFS admission while KV fits, token budget, preemption by recompute); docs/simulator.md.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from fapool.sim.cost_model import CostModel
from fapool.sim.errors import SimInputError
from fapool.sim.results import SimResult, build_result
from fapool.sim.strategies import StepBatch, StepCost, Strategy
from fapool.sim.workload import Workload


@dataclass(frozen=True)
class SimConfig:
    prefill: str = "chunked"  # "chunked": prompts are prefilled here; "skip": they arrive prefilled
    max_num_batched_tokens: int = 8192  # per-step token budget (decode tokens + prefill chunks)
    max_sim_time: float = math.inf  # stop the clock here (unfinished requests are reported)
    warmup: float = 0.0  # seconds excluded from throughput and utilisation
    progress: bool = False
    timeline_points: int = 2000  # (time, running, cached tokens, step) samples kept per instance
    # Up to this many pure-decode steps with no first token, arrival or completion due become
    # one event timed by the trapezoid of the first and last step (exact for affine step times).
    max_macro_steps: int = 128

    def __post_init__(self) -> None:
        if self.prefill not in ("chunked", "skip"):
            raise SimInputError(f"prefill must be 'chunked' or 'skip', got {self.prefill!r}")
        if self.max_num_batched_tokens < 1:
            raise SimInputError("max_num_batched_tokens must be >= 1")


class _Requests:
    """Column store of every request the run has seen (grows for closed loops)."""

    def __init__(self, batch):
        self.n = n = len(batch)
        self.arrival = batch.arrival.astype(np.float64).copy()
        self.prompt = batch.prompt_len.astype(np.int64).copy()
        self.output = batch.output_len.astype(np.int64).copy()
        self.generated = batch.generated.astype(np.int64).copy()
        self.start_generated = self.generated.copy()
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.preemptions = np.zeros(n, np.int64)
        self.client = batch.client.astype(np.int64).copy()
        self.warm = batch.warm.copy() if batch.warm is not None else self.generated > 0

    def append(self, arrival: float, prompt: int, output: int, client: int) -> int:
        i = self.n
        if i >= len(self.arrival):
            grow = max(16, len(self.arrival))
            for name in ("arrival", "prompt", "output", "generated", "start_generated", "first_token", "finish",
                         "preemptions", "client", "warm"):
                arr = getattr(self, name)
                fill = np.nan if name in ("first_token", "finish") else 0
                setattr(self, name, np.concatenate([arr, np.full(grow, fill, dtype=arr.dtype)]))
        self.arrival[i], self.prompt[i], self.output[i], self.client[i] = arrival, prompt, output, client
        self.generated[i] = self.start_generated[i] = self.preemptions[i] = 0
        self.warm[i] = False
        self.n += 1
        return i


class _Instance:
    def __init__(self, idx: int, strategy: Strategy, cost: CostModel):
        self.idx, self.num_groups = idx, strategy.num_groups()
        spg = strategy.slots_per_group()
        n = self.num_groups * spg
        self.group = np.repeat(np.arange(self.num_groups), spg)
        self.req = np.full(n, -1, np.int64)
        self.ctx = np.zeros(n, np.int64)
        self.pre_left = np.zeros(n, np.int64)
        self.out_left = np.zeros(n, np.int64)
        self.order = np.zeros(n, np.int64)  # admission counter: larger = younger
        self.fresh = np.zeros(n, bool)  # admitted, first token not yet emitted
        self.free_slots = [list(range(g * spg + spg - 1, g * spg - 1, -1)) for g in range(self.num_groups)]
        self.ledger = strategy.make_ledger(cost, n, self.group)
        self.waiting: deque[int] = deque()
        self.busy = False
        self.pending: tuple | None = None  # (tokens added per slot, start time) of the step in flight
        self.gpu_busy, self.gpu_comm = np.zeros(strategy.num_gpus()), np.zeros(strategy.num_gpus())
        self.timeline: list[tuple[float, int, float, float]] = []
        self.steps, self.stride = 0, 1  # steps run; the timeline keeps every stride-th


class Simulator:
    def __init__(self, strategy: Strategy, cost: CostModel, workload: Workload, config: SimConfig | None = None):
        strategy.validate(cost)
        self.strategy, self.cost, self.workload, self.config = strategy, cost, workload, config or SimConfig()

    def run(self) -> SimResult:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.config
        first = self.workload.initial()
        if len(first) == 0:
            raise SimInputError("workload has no requests")
        self.reqs = _Requests(first)
        self.insts = [_Instance(i, self.strategy, self.cost) for i in range(self.strategy.replicas)]
        self.client_inst: dict[int, int] = {}
        self.events: list[tuple[float, int, int]] = []
        self.seq = self.tokens_window = self._finished_count = 0
        self.now = 0.0
        self.arrivals = deque(int(i) for i in np.argsort(self.reqs.arrival[: self.reqs.n], kind="stable"))
        total = int(getattr(self.workload, "num_requests", self.reqs.n))
        cols = TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        with Progress(*cols, transient=True, disable=not cfg.progress) as bar:
            task = bar.add_task(self.strategy.describe()[:60], total=total)
            shown = 0
            while self._next_event():
                if self._finished_count - shown >= 64:
                    shown = self._finished_count
                    bar.update(task, completed=shown)
        return build_result(self, min(self.now, cfg.max_sim_time))

    def _next_event(self) -> bool:
        """Advance the clock to the next arrival or step end and handle it; False when none is left."""
        arrivals = self.arrivals
        t_arr = self.reqs.arrival[arrivals[0]] if arrivals else math.inf
        t_evt = self.events[0][0] if self.events else math.inf
        t = min(t_arr, t_evt)
        if math.isinf(t) or t > self.config.max_sim_time:
            return False
        self.now = t
        if t_arr <= t_evt:
            # Take every request arriving at this instant before any idle instance starts
            # a step, so a burst forms one batch rather than a batch of one.
            touched = []
            while arrivals and self.reqs.arrival[arrivals[0]] <= t:
                rid = arrivals.popleft()
                inst = self._route(rid)
                inst.waiting.append(rid)
                touched.append(inst)
            for inst in touched:
                if not inst.busy:
                    self._start_step(inst)
        else:
            inst = self.insts[heapq.heappop(self.events)[2]]
            self._finish_step(inst)
            self._start_step(inst)
        return True

    def _route(self, rid: int) -> _Instance:
        client = int(self.reqs.client[rid])
        if client >= 0 and client in self.client_inst:
            return self.insts[self.client_inst[client]]
        inst = min(self.insts, key=lambda x: (int((x.req >= 0).sum()) + len(x.waiting), x.idx))
        if client >= 0:
            self.client_inst[client] = inst.idx
        return inst

    def _admit(self, inst: _Instance) -> None:
        """FCFS: admit from the head of the queue while a slot is free and the KV fits; the
        head blocks the rest (no overtaking). With several groups (AFD), the least-used one."""
        if not inst.waiting:
            return
        prefilled = self.config.prefill == "skip"
        inst.ledger.begin_admission((inst.ctx + inst.pre_left) * (inst.req >= 0))
        while inst.waiting:
            rid = inst.waiting[0]
            groups = [g for g in range(inst.num_groups) if inst.free_slots[g]]
            if not groups:
                return
            g = groups[0] if len(groups) == 1 else min(groups, key=lambda x: (inst.ledger.used[x], x))
            need = int(self.reqs.prompt[rid] + self.reqs.generated[rid])
            if not inst.ledger.can_admit(g, need + 1):
                return
            slot = inst.free_slots[g][-1]
            warm = bool(self.reqs.warm[rid]) and self.reqs.preemptions[rid] == 0
            now_tokens = need if (prefilled or warm) else 0
            if not inst.ledger.admit(slot, g, now_tokens, need - now_tokens):
                return
            inst.ctx[slot] = now_tokens
            inst.pre_left[slot] = need - now_tokens
            inst.free_slots[g].pop()
            inst.waiting.popleft()
            inst.req[slot] = rid
            inst.out_left[slot] = self.reqs.output[rid] - self.reqs.generated[rid]
            inst.order[slot] = self.seq
            inst.fresh[slot] = True
            self.seq += 1

    def _plan_tokens(self, inst: _Instance) -> tuple[np.ndarray, np.ndarray]:
        active = inst.req >= 0
        decode = active & (inst.pre_left == 0)
        new = decode.astype(np.int64)
        budget = self.config.max_num_batched_tokens - int(new.sum())
        prefilling = np.flatnonzero(active & (inst.pre_left > 0))
        for s in prefilling[np.argsort(inst.order[prefilling], kind="stable")]:
            if budget <= 0:
                break
            new[s] = c = int(min(inst.pre_left[s], budget))
            budget -= c
        return new, decode

    def _start_step(self, inst: _Instance) -> None:
        if inst.busy:
            return
        self._admit(inst)
        while True:
            new, decode = self._plan_tokens(inst)
            if not new.any():
                inst.busy = False
                return
            if (domain := inst.ledger.try_allocate(inst.ctx, new)) is None:
                break
            held = inst.ledger.holds(domain) & (inst.req >= 0)
            if not held.any():
                held = inst.req >= 0
            victims = np.flatnonzero(held)
            slot = int(victims[np.argmax(inst.order[victims])])  # the youngest, recomputed later
            rid = int(inst.req[slot])
            self.reqs.preemptions[rid] += 1
            self._free(inst, slot)
            inst.waiting.appendleft(rid)
        sc = self.strategy.step_cost(self.cost, StepBatch(inst.ctx.copy(), new, inst.group), inst.ledger)
        if not sc.duration > 0 or not math.isfinite(sc.duration):
            raise RuntimeError(f"non-positive step time {sc.duration} from {self.strategy.describe()}")
        k = self._macro_k(inst, new, decode, sc.duration)
        if k > 1 and inst.ledger.try_allocate(inst.ctx + new, new * (k - 1)) is not None:
            k = 1  # the further steps' KV does not fit: run this one step alone
        if k > 1:
            if hasattr(inst.ledger, "placed"):
                inst.ledger.placed = inst.ledger.placed / (k - 1)
            last = self.strategy.step_cost(self.cost, StepBatch(inst.ctx + k - 1, new, inst.group), inst.ledger)
            sc = StepCost(k * (sc.duration + last.duration) / 2, k * (sc.busy + last.busy) / 2,
                          k * (sc.comm + last.comm) / 2)
            new = new * k
        if self.now >= self.config.warmup:
            inst.gpu_busy += sc.busy
            inst.gpu_comm += sc.comm
        inst.steps += 1
        if inst.steps % inst.stride == 0:
            inst.timeline.append((self.now, int((inst.req >= 0).sum()), float(inst.ctx.sum()), sc.duration / k))
            if len(inst.timeline) >= 2 * self.config.timeline_points:
                inst.timeline = inst.timeline[::2]
                inst.stride *= 2
        inst.pending, inst.busy = (new, self.now), True
        self.seq += 1
        heapq.heappush(self.events, (self.now + sc.duration, self.seq, inst.idx))

    def _macro_k(self, inst: _Instance, new: np.ndarray, decode: np.ndarray, step: float) -> int:
        """How many identical decode steps may run as one event (1 = just this step)."""
        cfg = self.config
        active = inst.req >= 0
        if (new != decode).any() or (inst.fresh & active).any():
            return 1  # prefill chunks, or a first token whose time must be exact
        k = min(cfg.max_macro_steps, int(inst.out_left[active].min()))
        horizon = min(self.reqs.arrival[self.arrivals[0]] if self.arrivals else math.inf, cfg.max_sim_time)
        if self.events:
            horizon = min(horizon, self.events[0][0]) if len(self.insts) > 1 else horizon
        if math.isfinite(horizon):
            k = min(k, int((horizon - self.now) / step))
        return max(1, k)

    def _free(self, inst: _Instance, slot: int) -> None:
        inst.ledger.free(slot)
        inst.req[slot] = -1
        inst.ctx[slot] = inst.pre_left[slot] = inst.out_left[slot] = 0
        inst.free_slots[int(inst.group[slot])].append(slot)

    def _finish_step(self, inst: _Instance) -> None:
        new, started = inst.pending
        inst.pending, inst.busy = None, False
        now = self.now
        was_prefill = inst.pre_left > 0
        inst.ctx += new
        inst.pre_left -= np.where(was_prefill, new, 0)
        slots = np.flatnonzero((new > 0) & (inst.pre_left == 0))
        if not len(slots):
            return
        # A decode slot emits one token a step (k in a macro step); a finished prefill, one.
        n_emit = np.where(was_prefill, 1, new)[slots]
        rids = inst.req[slots]
        r = self.reqs
        r.generated[rids] += n_emit
        r.first_token[rids[np.isnan(r.first_token[rids])]] = now
        inst.fresh[slots] = False
        inst.out_left[slots] -= n_emit
        if started >= self.config.warmup:
            self.tokens_window += int(n_emit.sum())
        for s in slots[inst.out_left[slots] <= 0]:
            rid = int(inst.req[s])
            r.finish[rid] = now
            self._finished_count += 1
            self._free(inst, int(s))
            client = int(r.client[rid])
            if self.workload.closed_loop and client >= 0:
                if (nxt := self.workload.replenish(client, now)) is not None:
                    inst.waiting.append(r.append(now, nxt[0], nxt[1], client))


def simulate(strategy: Strategy, cost: CostModel, workload: Workload, config: SimConfig | None = None) -> SimResult:
    return Simulator(strategy, cost, workload, config).run()
