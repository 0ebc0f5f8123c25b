"""Hardware profiles: the *effective* rates the roofline cost model needs (presets: datasheet peaks
times assumed efficiencies; `fapool calibrate` fits them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fapool.sim.errors import SimInputError


@dataclass(frozen=True)
class LinkProfile:
    """Bandwidth a direction (bytes/s), per-message latency (s), latency of each further ring step (s)."""

    bandwidth: float
    latency: float
    hop_latency: float = 1e-6

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            raise SimInputError(f"link needs bandwidth > 0 and latency >= 0, got {self}")


def _non_negative(obj, what: str) -> None:
    for f in dataclasses.fields(obj):
        if f.type == "float" and getattr(obj, f.name) < 0:
            raise SimInputError(f"{what} field {f.name} must be >= 0, got {getattr(obj, f.name)}")


@dataclass(frozen=True)
class HostProfile:
    """What the engine's host adds to a step beyond the device's work: serial work and eager launches
    (fitted by `fapool calibrate`)."""

    step_s: float = 0.0
    per_seq_s: float = 0.0
    per_kv_token_s: float = 0.0
    launch_layer_s: float = 0.0
    launch_step_s: float = 0.0
    cuda_graphs: bool = False  # the engine replays CUDA graphs for single-device decode steps
    launch_overlaps_device: bool = True
    async_scheduling: bool = False  # a graph step's serial host work overlaps the device's

    def __post_init__(self) -> None:
        _non_negative(self, "host")

    def serial(self, n_seqs, kv_tokens):
        """step_s + per_seq_s * seqs + per_kv_token_s * cached tokens (arrays allowed)."""
        return self.step_s + self.per_seq_s * n_seqs + self.per_kv_token_s * kv_tokens

    def launches(self, layers: int) -> float:
        """Host seconds to launch an eager step of `layers` layers (a GPU overlaps them)."""
        return self.launch_step_s + self.launch_layer_s * layers


@dataclass(frozen=True)
class PoolOverheads:
    """Fixed costs of the attention pool's machinery: a worker call (one layer of one micro-batch), the
    driver's per-layer and per-step work (fitted by `fapool calibrate --pool`)."""

    worker_call_s: float = 0.0
    worker_per_seq_s: float = 0.0
    driver_mb_s: float = 0.0
    driver_pool_mb_s: float = 0.0
    driver_route_s: float = 0.0
    driver_step_s: float = 0.0

    def __post_init__(self) -> None:
        _non_negative(self, "pool")

    def worker_calls(self, calls, seqs):
        """Worker seconds of `calls` calls over `seqs` sequences in all (arrays allowed)."""
        return self.worker_call_s * calls + self.worker_per_seq_s * seqs

    def driver_layer(self, micro_batches: float, pool_micro_batches: float, routes: float) -> float:
        """Driver seconds a layer beyond its dense work, over all its micro-batches."""
        return (self.driver_mb_s * micro_batches + self.driver_pool_mb_s * pool_micro_batches
                + self.driver_route_s * routes)


@dataclass(frozen=True)
class RankOverheads:
    """The engine's own cost of exchanges between dense / AFD / pool ranks beyond the link model (fitted
    by `fapool calibrate --pool` on a CPU from multi-rank engine runs at two depths, to the whole step)."""

    exchange_s: float = 0.0  # a side's work per (layer, micro-batch) exchange with its peer rank
    concurrent_stretch: float = 1.0  # how much slower a rank computes while another computes beside it
    allreduce_extra_s: tuple[tuple[int, float], ...] = ()  # (ranks, seconds an all-reduce adds)
    step_extra_s: tuple[tuple[int, float], ...] = ()  # (processes, seconds a step adds: plans, reports)
    # (pool workers, seconds a layer, seconds a step) a one-micro-batch pool step adds beyond its parts
    pool_extra_s: tuple[tuple[int, float, float], ...] = ()
    # (stages, seconds a layer, seconds a step) a PP step adds beyond its parts and step_extra_s
    pp_extra_s: tuple[tuple[int, float, float], ...] = ()
    # pool_extra_s for a pool step of two micro-batches (its own engines: the driver's machinery runs per
    # micro-batch, and which other term absorbs it moves between calibrations)
    pool_mb2_extra_s: tuple[tuple[int, float, float], ...] = ()

    def __post_init__(self) -> None:
        bad_ar = any(n < 2 or s < 0 for n, s in self.allreduce_extra_s + self.step_extra_s)
        rests = self.pool_extra_s + self.pool_mb2_extra_s + self.pp_extra_s
        bad_ar |= any(n < 1 or a < 0 or s < 0 for n, a, s in rests)
        if self.exchange_s < 0 or self.concurrent_stretch < 1 or bad_ar:
            raise SimInputError(f"rank overheads must be >= 0 over >= 2 ranks (stretch >= 1), got {self}")


def contention_stretch(busy_processes: int, cores: int | None) -> float:
    """Processor sharing: how much longer work takes when `busy_processes` share `cores` (None: no limit)."""
    return 1.0 if cores is None or busy_processes <= cores else busy_processes / cores


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: float  # device memory
    gemm_flops: float  # effective FLOP/s of a large GEMM in `dtype_bytes` precision
    gemm_bandwidth: float  # effective bytes/s when a GEMM is memory-bound (small batch)
    attn_flops: float  # effective FLOP/s of attention (prefill, compute-bound)
    attn_bandwidth: float  # effective bytes/s of decode attention streaming KV
    kernel_overhead: float  # fixed seconds per GEMM launch (launch + tail)
    attn_overhead: float  # fixed seconds per attention call
    intra_node: LinkProfile  # NVLink (or shared memory on CPU)
    inter_node: LinkProfile  # NIC (IB / RoCE)
    gpus_per_node: int = 8
    dtype_bytes: int = 2  # bf16 on GPUs, float32 on CPU
    memory_utilization: float = 0.9  # fraction of memory the engine may use
    reserved_bytes: float = 2e9  # activations, workspace, CUDA context
    cost_per_hour: float = 1.0  # $ per device-hour (assumption; for per-GPU cost only)
    source: str = "preset"  # "preset" or the calibration file it came from
    # Calibrated device time of a layer / a step beyond the GEMM and attention rooflines (small
    # kernels, gaps); presets: 0 / None (step_overhead is then 20 kernel overheads).
    layer_fixed_s: float = 0.0
    step_fixed_s: float | None = None
    host: HostProfile | None = None  # None: no host model (device time only)
    gemm_by_m: tuple[tuple[int, float, float], ...] = ()  # calibrated (m, FLOP/s, bytes/s) per GEMM rows m
    attn_by_bytes: tuple[tuple[float, float], ...] = ()  # calibrated (bytes, s) of decode attention calls
    pool: PoolOverheads | None = None  # None: the pool's machinery costs nothing beyond its parts
    cpu_cores: int | None = None  # CPU: the cores the engine's processes share (contention_stretch)
    ranks: RankOverheads | None = None  # None: exchanges cost what the link model says
    # Calibrated sparse decode of a layer: (s a call, a row, a summary block scored, a KV token read)
    sparse_decode: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "gemm_flops", "gemm_bandwidth", "attn_flops", "attn_bandwidth"):
            if getattr(self, name) <= 0:
                raise SimInputError(f"hardware field {name} must be > 0, got {getattr(self, name)}")
        if any(m < 1 or f <= 0 or b <= 0 for m, f, b in self.gemm_by_m):
            raise SimInputError(f"gemm_by_m entries need m >= 1 and rates > 0, got {self.gemm_by_m}")
        if self.layer_fixed_s < 0 or (self.step_fixed_s is not None and self.step_fixed_s < 0):
            raise SimInputError("layer_fixed_s and step_fixed_s must be >= 0")
        if self.cpu_cores is not None and self.cpu_cores < 1:
            raise SimInputError(f"cpu_cores must be >= 1, got {self.cpu_cores}")
        if self.gpus_per_node < 1 or self.dtype_bytes not in (1, 2, 4):
            raise SimInputError("gpus_per_node must be >= 1 and dtype_bytes 1, 2 or 4")

    @property
    def kv_budget_bytes(self) -> float:
        """Bytes a device can give to weights + KV."""
        return self.memory_bytes * self.memory_utilization - self.reserved_bytes

    def link(self, same_node: bool) -> LinkProfile:
        return self.intra_node if same_node else self.inter_node

    def replace(self, **changes) -> HardwareProfile:
        return dataclasses.replace(self, **changes)


def _gpu(name: str, peak_flops: float, hbm: float, memory: float, cost: float) -> HardwareProfile:
    return HardwareProfile(
        name=name, memory_bytes=memory, gpus_per_node=8, dtype_bytes=2, cost_per_hour=cost,
        gemm_flops=0.70 * peak_flops, gemm_bandwidth=0.80 * hbm,
        # flash-attention forward reaches ~50-60% of peak on Hopper
        attn_flops=0.50 * peak_flops, attn_bandwidth=0.75 * hbm,
        kernel_overhead=4e-6, attn_overhead=6e-6,
        intra_node=LinkProfile(bandwidth=0.80 * 450e9, latency=8e-6, hop_latency=1e-6),
        inter_node=LinkProfile(bandwidth=0.80 * 50e9, latency=15e-6, hop_latency=4e-6),
    )


def get_hardware(name: str) -> HardwareProfile:
    """A preset by name (h100, h200, cpu); SimInputError names the choices otherwise."""
    presets = {
        "h100": _gpu("h100", 989e12, 3.35e12, 80e9, cost=2.50),
        "h200": _gpu("h200", 989e12, 4.8e12, 141e9, cost=3.20),
        # A CPU "device" = one engine worker process: float32, the same-host transport (Unix sockets).
        # Rough; run `fapool calibrate` for real numbers.
        "cpu": HardwareProfile(
            name="cpu", memory_bytes=16e9, gpus_per_node=64, dtype_bytes=4, reserved_bytes=0.5e9,
            cost_per_hour=0.05, gemm_flops=2e11, gemm_bandwidth=2e10, attn_flops=5e10, attn_bandwidth=1e10,
            kernel_overhead=2e-5, attn_overhead=5e-5,
            intra_node=LinkProfile(bandwidth=2e9, latency=1e-4, hop_latency=2e-5),
            inter_node=LinkProfile(bandwidth=1e9, latency=2e-4, hop_latency=5e-5),
        ),
    }
    if name.lower() not in presets:
        raise SimInputError(f"unknown hardware {name!r}; choose one of: {', '.join(sorted(presets))}")
    return presets[name.lower()]
