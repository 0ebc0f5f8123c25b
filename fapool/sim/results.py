"""What a simulation run reports (latency, throughput, per-GPU time, cost per token) as JSON or a rich
table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PCTS = (50, 90, 99)


def _pct(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PCTS}}
    return {"mean": float(x.mean()), **{f"p{p}": float(np.percentile(x, p)) for p in PCTS}}


@dataclass
class SimResult:
    strategy: str
    workload: str
    hardware: str
    num_gpus: int
    sim_time: float  # simulated seconds measured (after warm-up)
    requests_total: int
    requests_finished: int
    output_tokens: int  # in the measured window
    preemptions: int
    ttft: np.ndarray  # per finished request (warm-start requests excluded), seconds
    tpot: np.ndarray
    e2e: np.ndarray
    gpu_labels: list[str]
    gpu_util: np.ndarray  # compute-busy fraction of the window, per GPU (all instances)
    gpu_comm: np.ndarray  # communication fraction
    cost_per_hour: float
    timeline: list[list[tuple[float, int, float, float]]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.sim_time if self.sim_time > 0 else 0.0

    @property
    def throughput_per_gpu(self) -> float:
        return self.throughput / self.num_gpus

    @property
    def gpu_seconds_per_token(self) -> float:
        return self.num_gpus * self.sim_time / max(1, self.output_tokens)

    @property
    def gpu_idle(self) -> np.ndarray:
        return np.clip(1.0 - self.gpu_util - self.gpu_comm, 0.0, 1.0)

    @property
    def comm_share(self) -> float:
        """Communication as a share of all GPU-busy time (compute + communication)."""
        total = self.gpu_util.sum() + self.gpu_comm.sum()
        return float(self.gpu_comm.sum() / total) if total > 0 else 0.0

    @property
    def usd_per_million_tokens(self) -> float:
        return self.gpu_seconds_per_token * 1e6 * self.cost_per_hour / 3600

    def slo_attainment(self, tpot_slo: float) -> float:
        return float((self.tpot <= tpot_slo).mean()) if len(self.tpot) else float("nan")

    def summary(self, tpot_slo: float | None = None) -> dict:
        util, idle = self.gpu_util, self.gpu_idle
        out = {
            "strategy": self.strategy, "workload": self.workload, "hardware": self.hardware,
            "num_gpus": self.num_gpus, "sim_time_s": self.sim_time, "requests_total": self.requests_total,
            "requests_finished": self.requests_finished, "output_tokens": self.output_tokens,
            "preemptions": self.preemptions, "throughput_tok_s": self.throughput,
            "throughput_per_gpu_tok_s": self.throughput_per_gpu,
            "gpu_seconds_per_token": self.gpu_seconds_per_token,
            "usd_per_million_tokens": self.usd_per_million_tokens,
            "ttft_s": _pct(self.ttft), "tpot_s": _pct(self.tpot), "e2e_s": _pct(self.e2e),
            "gpu_util_mean": float(util.mean()), "gpu_util_min": float(util.min()),
            "gpu_util_max": float(util.max()), "comm_share": self.comm_share, "idle_mean": float(idle.mean()),
            "per_gpu": {lab: {"util": float(u), "comm": float(c), "idle": float(i)}
                        for lab, u, c, i in zip(self.gpu_labels, util, self.gpu_comm, idle, strict=True)},
        }
        if tpot_slo is not None:
            out.update(tpot_slo_s=tpot_slo, slo_attainment=self.slo_attainment(tpot_slo))
        return out


def build_result(sim, end: float) -> SimResult:
    r, n = sim.reqs, sim.reqs.n
    window = max(0.0, end - sim.config.warmup)
    done = ~np.isnan(r.finish[:n])
    measured = done & ~r.warm[:n] & (r.preemptions[:n] >= 0)
    decode_tokens = r.output[:n] - r.start_generated[:n] - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot_all = (r.finish[:n] - r.first_token[:n]) / decode_tokens
    labels, util, comm = [], [], []
    for inst in sim.insts:
        prefix = f"i{inst.idx}." if len(sim.insts) > 1 else ""
        labels += [prefix + lab for lab in sim.strategy.gpu_labels()]
        for out, seconds in ((util, inst.gpu_busy), (comm, inst.gpu_comm)):
            out.append(seconds / window if window > 0 else seconds * 0)
    return SimResult(
        sim.strategy.describe(), sim.workload.describe(), sim.cost.hw.name, sim.strategy.total_gpus(), window,
        n, int(done.sum()), int(sim.tokens_window), int(r.preemptions[:n].sum()),
        ttft=(r.first_token[:n] - r.arrival[:n])[measured], tpot=tpot_all[measured & (decode_tokens > 0)],
        e2e=(r.finish[:n] - r.arrival[:n])[measured], gpu_labels=labels, gpu_util=np.concatenate(util),
        gpu_comm=np.concatenate(comm),
        cost_per_hour=sim.cost.hw.cost_per_hour, timeline=[inst.timeline for inst in sim.insts],
    )


def results_table(results: list[SimResult], title: str = "simulated", tpot_slo: float | None = None):
    """A rich Table comparing runs side by side."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("strategy", "GPUs", "tok/s", "tok/s/GPU", "TPOT p50/p99 ms", "TTFT p50/p99 s", "util", "comm",
                "idle", "GPU-s/Mtok", "$/Mtok", "preempt"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    if tpot_slo is not None:
        t.add_column(f"SLO<={tpot_slo * 1e3:g}ms", justify="right")
    for r in results:
        tp, tt = _pct(r.tpot), _pct(r.ttft)
        row = [r.strategy, str(r.num_gpus), f"{r.throughput:,.0f}", f"{r.throughput_per_gpu:,.0f}",
               f"{tp['p50'] * 1e3:.1f}/{tp['p99'] * 1e3:.1f}", f"{tt['p50']:.2f}/{tt['p99']:.2f}",
               f"{r.gpu_util.mean():.0%}", f"{r.comm_share:.0%}", f"{r.gpu_idle.mean():.0%}",
               f"{r.gpu_seconds_per_token * 1e6:,.0f}", f"{r.usd_per_million_tokens:.3f}", str(r.preemptions)]
        if tpot_slo is not None:
            row.append(f"{r.slo_attainment(tpot_slo):.0%}")
        t.add_row(*row)
    return t
