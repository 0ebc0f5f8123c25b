"""The engine's one configuration tree: frozen dataclasses passed down, no globals.

Derived numbers are properties or returned by functions; nothing is written back.
Low layers (kernels, block pool) take plain scalars, not these objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "seed-gelu")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


class ConfigError(ValueError):
    """A model or engine configuration that cannot be served."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. Only 'llama3' changes frequencies here;
    'default' (or None) means plain RoPE."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow Hugging Face's config.json
    where one exists, so readers can map them one to one."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    hidden_act: str = "silu"
    gated_mlp: bool = True  # SwiGLU (gate * up) vs a plain up -> act -> down FFN
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # recorded; full attention is used when None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config field {name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ("default", "llama3"):
            raise ConfigError(
                f"unsupported rope_scaling type {self.rope_scaling.rope_type!r}; supported: default, llama3"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        ffn = (3 if self.gated_mlp else 2) * h * f
        per_layer = attn + ffn + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")
QUANTIZATIONS = ("int8", "int4")  # weight-only, CPU (fapool.layers.cpu_quant)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory budget for K/V. On GPU, gpu_memory_utilization of the card's memory minus what
    # weights and activations take; on CPU, kv_cache_memory bytes (default 1 GiB).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # explicit override, mostly for tests
    enable_prefix_caching: bool = True
    # "auto": the model's dtype (bf16 under CPU quantization, cpu_quant.quantized_kv_dtype);
    # "fp8" (= "fp8_e4m3"): e4m3 with per-layer scales; "int8": int8 with a scale per token and
    # KV head (fapool.attention.kv_quant). Each about half the bytes of bf16 per token.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # Schedule step n+1 while step n runs on the device: greedy tokens stay on the device as the
    # next step's inputs and reach the host one step late (vLLM's async scheduling, SGLang's
    # overlap scheduler). None: on where the device runs asynchronously (CUDA), off on CPU.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Attention-FFN disaggregation (seed 002): attention ranks, each owning a share of the
    # requests (their KV and attention layers), and FFN ranks running every layer's FFN for all
    # of them (tensor parallel among themselves). None: off; both are set together.
    afd_attention_ranks: int | None = None
    afd_ffn_ranks: int | None = None
    # "mp": worker processes this engine spawns (or torchrun started); "ray": the ranks are Ray
    # actors (worker/ray_ranks), the attention pool's started when it grows and stopped when
    # idle (worker/ray_pool).
    distributed_executor: str = "mp"
    ray_address: str | None = None  # an existing Ray cluster ("auto", "host:port"); None: a local one

    def __post_init__(self) -> None:
        if self.distributed_executor not in ("mp", "ray"):
            raise ConfigError(f"distributed_executor must be mp or ray, got {self.distributed_executor!r}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ConfigError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        afd = {"afd_attention_ranks": self.afd_attention_ranks, "afd_ffn_ranks": self.afd_ffn_ranks}
        given = {k: v for k, v in afd.items() if v is not None}
        if given and len(given) < 2:
            (name,) = set(afd) - set(given)
            raise ConfigError(f"attention-FFN disaggregation needs {name} too (both >= 1)")
        for name, value in given.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if given and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ConfigError(
                "afd_attention_ranks / afd_ffn_ranks replace tensor_parallel_size / pipeline_parallel_size "
                "(the FFN ranks are tensor parallel among themselves): set one topology"
            )

    @property
    def afd(self) -> bool:
        return self.afd_attention_ranks is not None

    @property
    def world_size(self) -> int:
        """Ranks without the attention pool's workers: AFD's attention and FFN ranks, or TP x PP."""
        if self.afd:
            return self.afd_attention_ranks + self.afd_ffn_ranks
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class PoolConfig:
    """FA Pool (seed 000): attention of long sequences moves onto a pool of attention workers."""

    attention_workers: int = 0  # 0 disables the pool
    pool_threshold: int = 4096  # tokens; a sequence's KV stays local below this
    tokens_per_pool_worker: int = 4096  # one more pool worker per this many tokens past the threshold
    pool_mode: str = "shard"  # "shard" (split KV, merge by LSE) | "replicate" (seed's query split) | "head"
    # Micro-batches per step (one's remote attention overlaps another's dense work); None: the
    # driver picks 1 or 2 per step from the step times it measures (StepPlanner).
    micro_batches: int | None = None
    head_placement: str = "contiguous"  # head mode: "contiguous" or "lpt" (weighted, seed 003)
    worker_kv_blocks: int | None = None  # KV blocks per attention worker (default: as many as local)
    worker_timeout_s: float = 60.0  # a worker silent this long during a step counts as failed
    # Ray executor: a worker that has held no KV this long is stopped (its memory and device
    # go back to Ray); None: never.
    pool_idle_timeout_s: float | None = 60.0
    # Ray executor: a worker that a running sequence's KV will reach within this many more
    # tokens is started ahead, so its join (seconds) does not stall a step; 0: on demand.
    pool_prestart_tokens: int = 128

    def __post_init__(self) -> None:
        if self.pool_prestart_tokens < 0:
            raise ConfigError(f"pool_prestart_tokens must be >= 0, got {self.pool_prestart_tokens}")
        if self.pool_idle_timeout_s is not None and self.pool_idle_timeout_s < 0:
            raise ConfigError(f"pool_idle_timeout_s must be >= 0, got {self.pool_idle_timeout_s}")
        if self.attention_workers < 0:
            raise ConfigError(f"attention_workers must be >= 0, got {self.attention_workers}")
        if self.pool_threshold < 0 or self.tokens_per_pool_worker < 1:
            raise ConfigError("pool_threshold must be >= 0 and tokens_per_pool_worker >= 1")
        if self.pool_mode not in ("shard", "replicate", "head"):
            raise ConfigError(f"pool_mode must be shard, replicate or head, got {self.pool_mode!r}")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ConfigError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.head_placement not in ("contiguous", "lpt"):
            raise ConfigError(f"head_placement must be contiguous or lpt, got {self.head_placement!r}")
        if self.worker_timeout_s <= 0:
            raise ConfigError("worker_timeout_s must be positive")


# Sparse decode runs in steps whose longest KV reaches this (fapool.attention.sparse.SparseGate).
DEFAULT_SPARSE_MIN_CONTEXT = 4096


def ray_runs(attention_workers: int, world_size: int) -> bool:
    """The topologies distributed_executor 'ray' runs: any of several ranks (the attention pool,
    TP, PP, AFD, the pool beside TP or PP), each rank but the driver a Ray actor
    (worker/ray_ranks), the pool's workers elastic ones (worker/ray_pool)."""
    return attention_workers > 0 or world_size > 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    attention_backend: str | None = None  # "torch" | "triton"; None: by device
    sparse_attention: str | None = None  # sparse decode profile JSON (fapool calibrate-heads); None: dense
    sparse_min_context: int = DEFAULT_SPARSE_MIN_CONTEXT  # sparse decode only in steps whose longest KV reaches this
    enforce_eager: bool = False  # no CUDA graphs (decode steps, or a dense rank's segments between exchanges)
    # Weights of the linears and the LM head: None (the model's dtype) or one of QUANTIZATIONS;
    # dtype stays the activations' (and the embedding's and KV's).
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.quantization is not None:
            self._check_quantization()
        if self.parallel.distributed_executor == "ray":
            par = self.parallel
            if not ray_runs(self.pool.attention_workers, par.world_size):
                raise ConfigError(
                    "distributed_executor 'ray' runs the ranks of a multi-rank engine as Ray actors: set "
                    "attention_workers, tensor_parallel_size, pipeline_parallel_size or afd_attention_ranks / "
                    "afd_ffn_ranks (this configuration has one rank)"
                )
        if self.parallel.afd:
            if self.pool.attention_workers:
                raise ConfigError(
                    "attention_workers (the attention pool) cannot be combined with afd_attention_ranks / "
                    "afd_ffn_ranks: they are separate topologies"
                )
            if self.sparse_attention:
                raise ConfigError("sparse_attention with afd_attention_ranks / afd_ffn_ranks is not supported")
            f = self.parallel.afd_ffn_ranks
            if self.model.intermediate_size % f:
                raise ConfigError(
                    f"afd_ffn_ranks {f} does not divide intermediate_size ({self.model.intermediate_size}): "
                    "the FFN ranks hold equal slices"
                )
        if self.cache.kv_cache_dtype != "auto":
            multi = self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size > 1 or self.parallel.afd
            if multi or self.pool.attention_workers or self.sparse_attention:
                raise ConfigError(
                    f"kv_cache_dtype {self.cache.kv_cache_dtype} runs in a single process with dense attention for now: "
                    "drop tensor/pipeline parallelism, the attention pool or sparse attention"
                )
        if self.sparse_min_context < 0:
            raise ConfigError(f"sparse_min_context must be >= 0, got {self.sparse_min_context}")
        if self.scheduler.max_model_len is not None and self.scheduler.max_model_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len ({self.scheduler.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({self.model.max_position_embeddings})"
            )

    def _check_quantization(self) -> None:
        q = self.quantization
        if q not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or none), got {q!r}")
        if self.device.split(":")[0] != "cpu":
            raise ConfigError(
                f"quantization {q} runs on the CPU only (PyTorch's CPU weight-only kernels); "
                f"device is {self.device!r}: use --dtype bfloat16 on a GPU"
            )
        if self.dtype == "float16":
            raise ConfigError(f"quantization {q} takes float32 or bfloat16 activations, not float16")
        par = self.parallel
        if par.tensor_parallel_size * par.pipeline_parallel_size > 1 or par.afd or self.pool.attention_workers:
            raise ConfigError(
                f"quantization {q} runs in a single process for now: drop tensor/pipeline parallelism, "
                "the attention pool or attention-FFN disaggregation"
            )

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model.max_position_embeddings


def seed000_model_config(vocab_size: int = 32000) -> ModelConfig:
    """The FA Pool paper's benchmark model: 4 layers, hidden 4096, 32 heads, FFN 16384,
    GELU (non-gated), pre-norm RMSNorm. Random weights; used by benchmarks and the simulator.
    Positions up to 256K, so long-prompt benchmarks (128K tokens) fit."""
    return ModelConfig(
        architecture="seed-gelu",
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=262144,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="gelu",
        gated_mlp=False,
    )


PRESETS = {"seed000": seed000_model_config}
