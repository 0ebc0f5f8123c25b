"""EngineArgs: the user-facing engine options in one place, shared by LLM(), the CLI and the
server, turned into the frozen EngineConfig once the model's config is known."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import torch

from fapool.config import (
    DEFAULT_SPARSE_MIN_CONTEXT,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    PoolConfig,
    SchedulerConfig,
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """A ConfigError saying why a device cannot be used, instead of torch's failure later."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a device torch knows: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {device!r}: no CUDA GPU is available (torch {torch.__version__}, {build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported")


@dataclass
class EngineArgs:
    model: str | None = None  # HF folder, .gguf file, "preset:seed000"; None: embedded SmolLM2
    device: str | None = None  # default: cuda if present, else cpu
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on GPU
    quantization: str | None = None  # weight-only "int8" | "int4" (CPU); None: weights in dtype
    attention_backend: str | None = None  # "torch" | "triton"; default: triton on GPU
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) | "fp8" (e4m3, per-layer scales) | "int8" (per token)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    async_scheduling: bool | None = None  # default: on for CUDA, off on CPU
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    afd_attention_ranks: int | None = None
    afd_ffn_ranks: int | None = None
    distributed_executor: str = "mp"  # "mp" | "ray" (the ranks and the attention pool's workers as Ray actors)
    ray_address: str | None = None
    attention_workers: int = 0
    pool_threshold: int = 4096
    tokens_per_pool_worker: int = 4096
    pool_mode: str = "shard"
    micro_batches: int | None = None
    head_placement: str = "contiguous"
    worker_kv_blocks: int | None = None
    worker_timeout_s: float = 60.0
    pool_idle_timeout_s: float | None = 60.0
    pool_prestart_tokens: int = 128
    sparse_attention: str | None = None  # profile JSON from `fapool calibrate-heads`; None: dense
    sparse_min_context: int = DEFAULT_SPARSE_MIN_CONTEXT  # steps with a shorter longest KV attend densely
    enforce_eager: bool = False  # no CUDA graphs
    plan: str | None = None  # `fapool plan --json` output: take its recommended topology

    def with_plan(self) -> EngineArgs:
        """These arguments with the plan file's recommended topology (engine_args) applied. An
        argument the caller set to another value than the plan's is a ConfigError."""
        if self.plan is None:
            return self
        try:
            with open(self.plan) as f:
                planned = json.load(f)["engine_args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"plan {self.plan!r}: not a `fapool plan --json` file ({e})") from None
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in planned.items():
            if name not in defaults:
                raise ConfigError(f"plan {self.plan!r}: unknown engine argument {name!r}")
            mine = getattr(self, name)
            if mine != defaults[name] and mine != value:
                raise ConfigError(f"plan {self.plan!r} sets {name}={value!r}, but {name}={mine!r} was given")
        return dataclasses.replace(self, plan=None, **planned)

    def create_engine_config(self, model_config: ModelConfig) -> EngineConfig:
        if self.plan is not None:
            return self.with_plan().create_engine_config(model_config)
        device = self.device or default_device()
        check_device(device)
        dtype = self.dtype or ("float32" if device == "cpu" else "bfloat16")
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=self.kv_cache_memory,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_blocks=self.num_kv_blocks,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                async_scheduling=self.async_scheduling,
            ),
            parallel=ParallelConfig(
                self.tensor_parallel_size,
                self.pipeline_parallel_size,
                self.afd_attention_ranks,
                self.afd_ffn_ranks,
                self.distributed_executor,
                self.ray_address,
            ),
            pool=PoolConfig(
                attention_workers=self.attention_workers,
                pool_threshold=self.pool_threshold,
                tokens_per_pool_worker=self.tokens_per_pool_worker,
                pool_mode=self.pool_mode,
                micro_batches=self.micro_batches,
                head_placement=self.head_placement,
                worker_kv_blocks=self.worker_kv_blocks,
                worker_timeout_s=self.worker_timeout_s,
                pool_idle_timeout_s=self.pool_idle_timeout_s,
                pool_prestart_tokens=self.pool_prestart_tokens,
            ),
            device=device,
            dtype=dtype,
            seed=self.seed,
            attention_backend=self.attention_backend,
            sparse_attention=self.sparse_attention,
            sparse_min_context=self.sparse_min_context,
            enforce_eager=self.enforce_eager,
            quantization=self.quantization,
        )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=None, help="HF folder, .gguf file or preset:seed000 (default: embedded SmolLM2)")
        g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        g.add_argument(
            "--dtype", default=None, choices=["float32", "float16", "bfloat16"],
            help="weights, activations and KV (default: float32 on CPU, bfloat16 on GPU)",
        )
        g.add_argument(
            "--quantization", default=None, choices=list(QUANTIZATIONS),
            help="CPU, one process: weight-only quantized linears and LM head (--dtype stays the activations'). "
            "int4: groups of 32 with scale and offset (a Q4_1 GGUF's weights exactly); int8: per output "
            "channel. The head's top tokens are rescored in --dtype (default: weights in --dtype)",
        )
        g.add_argument(
            "--attention-backend", default=None, choices=["torch", "triton"],
            help="attention kernels (default: triton on GPU, torch on CPU)",
        )
        g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: %(default)s)")
        g.add_argument(
            "--kv-cache-memory", type=int, default=None,
            help="KV cache budget in bytes (default: GPU: from --gpu-memory-utilization; CPU: 1 GiB)",
        )
        g.add_argument(
            "--gpu-memory-utilization", type=float, default=0.9,
            help="share of the GPU's memory for weights, activations and KV (default: %(default)s)",
        )
        g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks, overriding the byte budgets")
        g.add_argument(
            "--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
            help="do not reuse the KV of shared prompt prefixes (default: reused)",
        )
        g.add_argument(
            "--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
            help="KV cache dtype: auto (the model's), fp8 (e4m3 with per-layer scales) or int8 (a scale per "
            "token and KV head: closer to the model's dtype than fp8); either 8-bit cache holds about twice "
            "the tokens and reads about half the bytes per decode step (default: %(default)s)",
        )
        g.add_argument("--max-num-seqs", type=int, default=128, help="requests running at once (default: %(default)s)")
        g.add_argument(
            "--max-num-batched-tokens", type=int, default=2048,
            help="tokens a step computes; longer prompts are prefilled in chunks (default: %(default)s)",
        )
        g.add_argument(
            "--max-model-len", type=int, default=None,
            help="longest sequence, prompt and output (default: the model's max_position_embeddings)",
        )
        g.add_argument(
            "--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
            help="schedule the next step while the device runs this one (default: on for CUDA)",
        )
        g.add_argument("--seed", type=int, default=0, help="seeds of requests that give none (default: %(default)s)")
        g.add_argument("--tp", dest="tensor_parallel_size", type=int, default=1, help="tensor-parallel ranks (default: %(default)s)")
        g.add_argument("--pp", dest="pipeline_parallel_size", type=int, default=1, help="pipeline stages (default: %(default)s)")
        g.add_argument(
            "--plan", default=None, metavar="FILE",
            help="take the topology `fapool plan --json FILE` recommended (TP/PP, pool or AFD ranks)",
        )
        g.add_argument(
            "--distributed-executor", default="mp", choices=["mp", "ray"],
            help="mp: worker processes started with the engine; ray: the ranks (TP, PP, AFD) as Ray actors, and "
            "attention-pool workers as Ray actors that start as the pool grows and stop when idle (default: %(default)s)",
        )
        g.add_argument(
            "--ray-address", "--address", dest="ray_address", default=None,
            help="ray: the cluster to join (auto, or host:port) so the pool can span hosts (default: a local Ray)",
        )
        g.add_argument(
            "--pool-idle-timeout-s", type=float, default=60.0,
            help="ray: stop a pool worker that held no KV this long (default: %(default)s)",
        )
        g.add_argument(
            "--pool-prestart-tokens", type=int, default=128,
            help="ray: start a pool worker ahead once a running sequence's KV will reach it within this many "
            "tokens, so its join does not stall a step; 0 starts workers on demand (default: %(default)s)",
        )
        g.add_argument(
            "--afd-attention-ranks", type=int, default=None,
            help="attention-FFN disaggregation (seed 002): ranks that each own a share of the requests' "
            "KV and attention; set with --afd-ffn-ranks (default: off)",
        )
        g.add_argument(
            "--afd-ffn-ranks", type=int, default=None,
            help="attention-FFN disaggregation: ranks running every layer's FFN for all requests, "
            "tensor parallel among themselves (default: off)",
        )
        g.add_argument(
            "--attention-workers", type=int, default=0,
            help="attention-pool worker processes (seed 000); 0: no pool (default: %(default)s)",
        )
        g.add_argument(
            "--pool-threshold", type=int, default=4096,
            help="a sequence's tokens beyond this go to the pool; 0: all of them, the dense side keeps "
            "no KV (Lamina, seed 004) (default: %(default)s)",
        )
        g.add_argument(
            "--tokens-per-pool-worker", type=int, default=4096,
            help="pooled tokens per worker before the pool grows (default: %(default)s)",
        )
        g.add_argument(
            "--pool-mode", default="shard", choices=["shard", "replicate", "head"],
            help="how pooled KV is split: by token range, copied, or by KV head (default: %(default)s)",
        )
        g.add_argument(
            "--micro-batches", type=int, default=None,
            help="pool / AFD: micro-batches per step, so one's remote work overlaps another's local work "
            "(default: 1 or 2, chosen per step from measured step times)",
        )
        g.add_argument(
            "--head-placement", default="contiguous", choices=["contiguous", "lpt"],
            help="head mode: contiguous heads, or LPT by sparse budgets (seed 003) (default: %(default)s)",
        )
        g.add_argument("--worker-kv-blocks", type=int, default=None, help="KV blocks per attention worker")
        g.add_argument(
            "--worker-timeout-s", type=float, default=60.0,
            help="a worker silent this long in a step is declared lost (default: %(default)s)",
        )
        g.add_argument(
            "--sparse-attention", default=None, metavar="PROFILE",
            help="sparse decode with per-head block budgets from this profile (fapool calibrate-heads)",
        )
        g.add_argument(
            "--sparse-min-context", type=int, default=DEFAULT_SPARSE_MIN_CONTEXT, metavar="TOKENS",
            help="with --sparse-attention: decode steps whose longest context is shorter attend densely "
            "(selection costs more than it saves there; 0: always sparse)",
        )
        g.add_argument(
            "--enforce-eager", action="store_true",
            help="no CUDA graphs: neither whole decode steps (one process) nor a dense rank's work between "
            "attention exchanges (multi-rank)",
        )

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})
