"""Hardware profiles: the numbers the roofline cost model needs, with presets.

A profile holds *effective* rates (what kernels reach), not datasheet peaks. Presets derive
them from public peak figures times an efficiency; a calibration JSON written by
`fapool calibrate` replaces them with fitted numbers for the device it ran on.

Preset sources (datasheet figures, dense bf16, no sparsity):
  H100 SXM5: 989 TFLOP/s, HBM3 3.35 TB/s, 80 GB; NVLink 4 900 GB/s bidirectional
             (450 GB/s a direction); one 400 Gb/s NDR NIC per GPU (50 GB/s).
  H200 SXM:  989 TFLOP/s, HBM3e 4.8 TB/s, 141 GB; same NVLink and NIC.
The efficiencies (GEMM 0.70, attention 0.75 of HBM, NVLink 0.80, NIC 0.80), latencies and
$/GPU-hour are assumptions, stated here so a reader can change them; they are not fitted
to any paper's figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fapool.sim.errors import SimInputError


@dataclass(frozen=True)
class LinkProfile:
    """One class of link: effective bandwidth a direction (bytes/s), per-message latency (s)
    and the extra latency each further ring step of a collective adds (s)."""

    bandwidth: float
    latency: float
    hop_latency: float = 1e-6

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            raise SimInputError(f"link needs bandwidth > 0 and latency >= 0, got {self}")


@dataclass(frozen=True)
class HostProfile:
    """What the engine's host adds to a step beyond the device's work (fitted by
    `fapool calibrate` from a short real engine decode; see docs/simulator.md):

        whole step = step_s + per_seq_s * seqs + per_kv_token_s * cached tokens   (serial host)
                     + device time, or max(device, launches) where launches overlap it;
                     for graph steps with async scheduling max(serial host, device time)

    step_s covers the scheduler's fixed work, the graph launch (graph mode), input preparation
    and sampling's fixed part; per_seq_s each running sequence's share (scheduling, sampling,
    output processing, its row of the inputs); per_kv_token_s the work that grows with the
    batch's cached tokens (block tables, prefix-cache hashing). Eager steps (no CUDA graph)
    launch every kernel from Python: `launch_layer_s` a layer, `launch_step_s` outside the
    layers. On a GPU those launches run ahead of the device (`launch_overlaps_device`); on a
    CPU the "device" is the same thread, so dispatch is already in the device's fixed costs and
    both launch terms are 0."""

    step_s: float = 0.0
    per_seq_s: float = 0.0
    per_kv_token_s: float = 0.0
    launch_layer_s: float = 0.0
    launch_step_s: float = 0.0
    cuda_graphs: bool = False  # the engine replays CUDA graphs for single-device decode steps
    launch_overlaps_device: bool = True
    # The engine schedules step n+1 while the device runs step n (its default on CUDA), so a
    # graph step's serial host work overlaps the device's instead of adding to it.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        for name in ("step_s", "per_seq_s", "per_kv_token_s", "launch_layer_s", "launch_step_s"):
            if getattr(self, name) < 0:
                raise SimInputError(f"host field {name} must be >= 0, got {getattr(self, name)}")

    def serial(self, n_seqs, kv_tokens):
        """Host seconds a step spends outside the device's work (arrays allowed)."""
        return self.step_s + self.per_seq_s * n_seqs + self.per_kv_token_s * kv_tokens

    def launches(self, layers: int) -> float:
        """Host seconds to launch an eager step of `layers` layers."""
        return self.launch_step_s + self.launch_layer_s * layers


@dataclass(frozen=True)
class PoolOverheads:
    """Fixed costs of the attention pool's own machinery (fitted by `fapool calibrate --pool`
    from a tiny-model pool run on a CPU; see docs/simulator.md):

      an attention worker, per call (one layer of one micro-batch that has work there):
          worker_call_s + worker_per_seq_s * sequences in the call   (beyond the attention
          roofline: unpacking the message, writing K/V, packing the reply)
      the pool driver, per layer:
          driver_mb_s * micro-batches (the micro-batch generators, each a yield a layer)
          + driver_pool_mb_s * micro-batches that send to the pool (posting the exchange,
            the merge)
          + driver_route_s * (micro-batch, worker) routes (packing and sending each worker's
            share, unpacking its partial)
          and driver_step_s a step (step plans out, worker reports back)."""

    worker_call_s: float = 0.0
    worker_per_seq_s: float = 0.0
    driver_mb_s: float = 0.0
    driver_pool_mb_s: float = 0.0
    driver_route_s: float = 0.0
    driver_step_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise SimInputError(f"pool field {f.name} must be >= 0, got {getattr(self, f.name)}")

    def worker_calls(self, calls, seqs):
        """Worker seconds of `calls` calls over `seqs` sequences in all (arrays allowed)."""
        return self.worker_call_s * calls + self.worker_per_seq_s * seqs

    def driver_layer(self, micro_batches: float, pool_micro_batches: float, routes: float) -> float:
        """Driver seconds a layer beyond its dense work, over all its micro-batches."""
        return (
            self.driver_mb_s * micro_batches
            + self.driver_pool_mb_s * pool_micro_batches
            + self.driver_route_s * routes
        )


def contention_stretch(busy_processes: int, cores: int | None) -> float:
    """Processor sharing: `busy_processes` runnable at once on `cores` cores each run at
    cores / busy_processes of full speed, so their work takes that much longer. 1 when the
    cores are not known (GPU profiles, presets) or suffice."""
    if cores is None or busy_processes <= cores:
        return 1.0
    return busy_processes / cores


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
    # Device time a layer / a step costs beyond its GEMMs' and attention's roofline: the small
    # kernels (norms, rotary, residual adds, KV write, activation) and the gaps between kernels.
    # Calibrated from the engine's own decode at two depths; 0 / None in presets, where
    # step_overhead falls back to 20 kernel overheads.
    layer_fixed_s: float = 0.0
    step_fixed_s: float | None = None
    host: HostProfile | None = None  # None: no host model (device time only)
    # (m, FLOP/s, bytes/s) of GEMMs with m rows, calibrated per m; the cost model interpolates
    # in log m. Empty: gemm_flops / gemm_bandwidth for every m.
    gemm_by_m: tuple[tuple[int, float, float], ...] = ()
    # (bytes, seconds) of the engine's decode attention calls, calibrated; the cost model
    # interpolates in log-log (a CPU's reference attention is far from a roofline: cache
    # effects and ~50 ops of fixed cost). Empty: the attention roofline.
    attn_by_bytes: tuple[tuple[float, float], ...] = ()
    pool: PoolOverheads | None = None  # None: the pool's machinery costs nothing beyond its parts
    # CPU "devices": the cores the engine's processes share (one torch thread each). A pool
    # configuration with more busy processes than cores is priced with contention_stretch.
    # None (GPUs, presets): every process has its own device.
    cpu_cores: int | None = None

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
        name=name,
        memory_bytes=memory,
        gemm_flops=0.70 * peak_flops,
        gemm_bandwidth=0.80 * hbm,
        attn_flops=0.50 * peak_flops,  # flash-attention forward reaches ~50-60% of peak on Hopper
        attn_bandwidth=0.75 * hbm,
        kernel_overhead=4e-6,
        attn_overhead=6e-6,
        intra_node=LinkProfile(bandwidth=0.80 * 450e9, latency=8e-6, hop_latency=1e-6),
        inter_node=LinkProfile(bandwidth=0.80 * 50e9, latency=15e-6, hop_latency=4e-6),
        gpus_per_node=8,
        dtype_bytes=2,
        cost_per_hour=cost,
    )


def _presets() -> dict[str, HardwareProfile]:
    return {
        "h100": _gpu("h100", 989e12, 3.35e12, 80e9, cost=2.50),
        "h200": _gpu("h200", 989e12, 4.8e12, 141e9, cost=3.20),
        # A CPU "device" = one engine worker process: float32, shared-memory transport (gloo).
        # Rough; run `fapool calibrate` for real numbers.
        "cpu": HardwareProfile(
            name="cpu",
            memory_bytes=16e9,
            gemm_flops=2e11,
            gemm_bandwidth=2e10,
            attn_flops=5e10,
            attn_bandwidth=1e10,
            kernel_overhead=2e-5,
            attn_overhead=5e-5,
            intra_node=LinkProfile(bandwidth=2e9, latency=1e-4, hop_latency=2e-5),
            inter_node=LinkProfile(bandwidth=1e9, latency=2e-4, hop_latency=5e-5),
            gpus_per_node=64,
            dtype_bytes=4,
            reserved_bytes=0.5e9,
            cost_per_hour=0.05,
        ),
    }


ALIASES = {"h100-sxm": "h100", "h100_sxm": "h100", "h200-sxm": "h200"}


def hardware_names() -> list[str]:
    return sorted(_presets())


def get_hardware(name: str) -> HardwareProfile:
    """A preset by name (h100, h200, cpu); SimInputError names the choices otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    presets = _presets()
    if key not in presets:
        raise SimInputError(f"unknown hardware {name!r}; choose one of: {', '.join(sorted(presets))}")
    return presets[key]
