"""Roofline cost model: seconds of each part of a step on one device, per *layer* unless a name says
otherwise (overhead + max(flops / rate, bytes / bandwidth)); scalars or arrays. docs/simulator.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fapool.config import PRESETS, ModelConfig
from fapool.sim.errors import SimInputError
from fapool.sim.hardware import HardwareProfile, contention_stretch
from fapool.sparse.selection import DEFAULT_MIN_BLOCKS, budget_blocks


def load_model_config(spec: str) -> ModelConfig:
    """A preset name (e.g. 'seed000') or a Hugging Face config.json, read by the engine's own parser."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SimInputError(f"unknown model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}) "
                            "and no config.json at that path")
    from fapool.models.hf_loader import config_from_dict

    try:
        return config_from_dict(json.loads(path.read_text()))
    except (OSError, TypeError, ValueError) as exc:  # ValueError: bad JSON and ConfigError
        raise SimInputError(f"{path}: {exc}") from exc


def _f64(x):
    """Scalars as they are (a fast path: the simulator prices thousands of steps), else float64 arrays."""
    return x if np.isscalar(x) else np.asarray(x, dtype=np.float64)


def _max(a, b):
    return max(a, b) if np.isscalar(a) and np.isscalar(b) else np.maximum(a, b)


def _if_positive(x, t):
    """`t` where `x` > 0, else 0."""
    if np.isscalar(x):
        return t if x > 0 else 0.0
    return np.where(x > 0, t, 0.0)[()]


@dataclass(frozen=True)
class CostModel:
    model: ModelConfig
    hw: HardwareProfile
    include_host: bool = True  # False: device time only (no host model even if the profile has one)

    def device_only(self) -> CostModel:
        return CostModel(self.model, self.hw, include_host=False)

    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.model.num_key_value_heads * self.model.head_dim * self.hw.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self.hw.dtype_bytes)

    def hidden_bytes(self, tokens) -> float:
        return tokens * self.model.hidden_size * self.hw.dtype_bytes

    def query_bytes(self, tokens, head_fraction: float = 1.0):
        """One layer's queries for `tokens`, as sent to a remote attention worker."""
        m = self.model
        return tokens * m.num_attention_heads * m.head_dim * self.hw.dtype_bytes * head_fraction

    def partial_bytes(self, tokens, head_fraction: float = 1.0):
        """One layer's partial attention result (out + float32 lse) coming back."""
        m = self.model
        return tokens * m.num_attention_heads * (m.head_dim * self.hw.dtype_bytes + 4) * head_fraction

    def weight_bytes(self, part: str = "all") -> float:
        """'attn' (qkv + o, all layers), 'ffn' (all layers), 'embed' (embedding + lm head), 'all'."""
        m = self.model
        q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
        attn = m.num_hidden_layers * (m.hidden_size * (q + 2 * kv) + q * m.hidden_size)
        ffn = m.num_hidden_layers * (3 if m.gated_mlp else 2) * m.hidden_size * m.intermediate_size
        embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
        parts = {"attn": attn, "ffn": ffn, "embed": embed, "all": attn + ffn + embed}
        if part not in parts:
            raise ValueError(f"unknown weight part {part!r}")
        return parts[part] * self.hw.dtype_bytes

    def gemm_rates(self, m):
        """(FLOP/s, bytes/s) of a GEMM of m rows: calibrated per-m rates interpolated in log m, or the
        profile's single pair."""
        hw = self.hw
        if not hw.gemm_by_m:
            return hw.gemm_flops, hw.gemm_bandwidth
        log_m, log_f, log_b = np.log(np.array(hw.gemm_by_m, dtype=np.float64)).T
        x = np.log(np.maximum(np.asarray(m, dtype=np.float64), 1.0))
        f, b = np.exp(np.interp(x, log_m, log_f)), np.exp(np.interp(x, log_m, log_b))
        return (float(f), float(b)) if np.ndim(x) == 0 else (f, b)

    def gemm(self, m, n: int, k: int):
        """[m, k] @ [k, n]; zero when m == 0."""
        if np.isscalar(m) and m <= 0:  # no rate lookup for the many steps without such rows
            return 0.0
        m, d = _f64(m), self.hw.dtype_bytes
        f, b = self.gemm_rates(m)
        t = self.hw.kernel_overhead + _max(2.0 * m * n * k / f, (m * k + k * n + m * n) * d / b)
        return _if_positive(m, t)

    def qkv_proj(self, tokens, tp: int = 1):
        m = self.model
        n = (math.ceil(m.num_attention_heads / tp) + 2 * math.ceil(m.num_key_value_heads / tp)) * m.head_dim
        return self.gemm(tokens, n, m.hidden_size)

    def o_proj(self, tokens, tp: int = 1):
        m = self.model
        return self.gemm(tokens, m.hidden_size, math.ceil(m.num_attention_heads / tp) * m.head_dim)

    def ffn(self, tokens, tp: int = 1):
        m = self.model
        f = math.ceil(m.intermediate_size / tp)
        up = self.gemm(tokens, f, m.hidden_size) * (2 if m.gated_mlp else 1)
        return up + self.gemm(tokens, m.hidden_size, f)

    def elementwise(self, nbytes):
        """Memory-bound pass (norms, residual adds, rotary, the LSE merge)."""
        nbytes = _f64(nbytes)
        return _if_positive(nbytes, self.hw.kernel_overhead + nbytes / self.hw.gemm_bandwidth)

    def layer_misc(self, tokens, tp: int = 1):
        """Norms, rotary and residual adds (~8 passes over the hidden state) + layer_fixed_s."""
        return self.elementwise(8 * self.hidden_bytes(tokens) / max(1, tp)) + self.hw.layer_fixed_s

    def _attn_table(self, nbytes):
        """Decode-attention seconds for `nbytes` from the calibrated table (log-log interpolation,
        the largest sample's rate above it)."""
        b, t = np.array(self.hw.attn_by_bytes, dtype=np.float64).T
        x = np.maximum(np.asarray(nbytes, dtype=np.float64), 1.0)
        inside = np.exp(np.interp(np.log(x), np.log(b), np.log(t)))
        out = np.where(x > b[-1], t[-1] * x / b[-1], inside)
        return float(out) if np.ndim(out) == 0 else out

    def attention(self, kv_read_tokens, qk_pairs, num_queries, head_fraction: float = 1.0):
        """`num_queries` queries reading `kv_read_tokens` cached tokens and scoring `qk_pairs`
        (query, key) pairs over `head_fraction` of the heads (decode: qk_pairs == kv_read_tokens)."""
        m, hw = self.model, self.hw
        scalar = np.isscalar(kv_read_tokens) and np.isscalar(qk_pairs) and np.isscalar(num_queries)
        kv_read, pairs, nq = (x if scalar else np.asarray(x, dtype=np.float64)
                              for x in (kv_read_tokens, qk_pairs, num_queries))
        if scalar and kv_read <= 0 and nq <= 0:
            return 0.0
        flops = 4.0 * m.num_attention_heads * m.head_dim * pairs * head_fraction
        nbytes = (kv_read * self.kv_bytes_per_token_layer() + 2 * self.query_bytes(nq)) * head_fraction
        if hw.attn_by_bytes:
            t = _max(self._attn_table(nbytes), hw.attn_overhead + flops / hw.attn_flops)
        else:
            t = hw.attn_overhead + _max(flops / hw.attn_flops, nbytes / hw.attn_bandwidth)
        return t if scalar else np.where((kv_read > 0) | (nq > 0), t, 0.0)[()]

    def sparse_attention(self, context: float, num_seqs: float, share: float,
                         head_fraction: float = 1.0) -> float:
        """A layer's sparse decode of `num_seqs` rows of `context` tokens, each KV head reading
        `share` of its blocks (at least DEFAULT_MIN_BLOCKS) after scoring all their summaries (calibrated)."""
        if not self.hw.sparse_decode:
            raise SimInputError("sparse attention needs a calibration with the sparse section (fapool calibrate --pool)")
        kv_heads = self.model.num_key_value_heads * head_fraction
        _, blocks, tokens = sparse_terms(num_seqs, context, share, kv_heads)
        call, row, block, token = self.hw.sparse_decode
        return call + num_seqs * row + blocks * block + tokens * token

    def lm_head(self, num_seqs, tp: int = 1):
        return self.gemm(num_seqs, math.ceil(self.model.vocab_size / tp), self.model.hidden_size)

    def allreduce(self, nbytes, n: int, same_node: bool = True):
        """Ring all-reduce of `nbytes` over n ranks: one launch latency, 2(n-1) ring steps."""
        if n <= 1:
            return 0.0
        link, nbytes = self.hw.link(same_node), _f64(nbytes)
        t = link.latency + 2 * (n - 1) * link.hop_latency + 2 * (n - 1) / n * nbytes / link.bandwidth
        if self.hw.ranks is not None:  # the engine's measured extra at this rank count (CPU)
            t = t + dict(self.hw.ranks.allreduce_extra_s).get(n, 0.0)
        return _if_positive(nbytes, t)

    def exchange(self) -> float:
        """A rank's own seconds per (layer, micro-batch) exchange with a peer (0 unless calibrated)."""
        return self.hw.ranks.exchange_s if self.hw.ranks is not None else 0.0

    def rank_step(self, processes: int) -> float:
        """Seconds a step of `processes` ranks adds beyond their layers (0 unless calibrated)."""
        return dict(self.hw.ranks.step_extra_s).get(processes, 0.0) if self.hw.ranks is not None else 0.0

    def pp_extra(self, stages: int, layers: int) -> float:
        """Seconds a step of `stages` pipeline stages over `layers` layers adds beyond its parts (0 unless calibrated)."""
        terms = {n: (a, s) for n, a, s in self.hw.ranks.pp_extra_s} if self.hw.ranks is not None else {}
        a, s = terms.get(stages, (0.0, 0.0))
        return a * layers + s

    def concurrency(self, busy: int) -> float:
        """How much slower each of `busy` ranks computing at once runs: core sharing past the cores
        times the calibrated stretch of sharing the host (1 where not measured)."""
        shared = self.hw.ranks.concurrent_stretch if self.hw.ranks is not None and busy > 1 else 1.0
        return contention_stretch(busy, self.hw.cpu_cores) * shared

    def p2p(self, nbytes, same_node: bool = False):
        """One send (or receive) of `nbytes`; arrays allowed (one entry per link)."""
        link, nbytes = self.hw.link(same_node), _f64(nbytes)
        return _if_positive(nbytes, link.latency + nbytes / link.bandwidth)

    def dense_layer(self, tokens, tp: int = 1, same_node: bool = True) -> tuple[float, float]:
        """(compute, all-reduce) seconds of one layer's non-attention work on one TP rank."""
        compute = self.qkv_proj(tokens, tp) + self.o_proj(tokens, tp) + self.ffn(tokens, tp)
        comm = 2 * self.allreduce(self.hidden_bytes(tokens), tp, same_node)
        return float(compute + self.layer_misc(tokens, tp)), float(comm)

    def step_overhead(self) -> float:
        """Fixed device work of a step outside the layers: calibrated, or 20 kernel overheads."""
        return self.hw.step_fixed_s if self.hw.step_fixed_s is not None else 20 * self.hw.kernel_overhead

    def finish_step(self, device_s, n_seqs=0.0, kv_tokens=0.0, graphs: bool = False, layers: int | None = None):
        """Wall seconds of a step whose layers and LM head take `device_s`: plus the fixed step
        cost, the host's serial work and the launches of `layers` layers (or one graph replay)."""
        t, host = device_s + self.step_overhead(), self.hw.host
        if host is None or not self.include_host:
            return t
        serial = host.serial(n_seqs, kv_tokens)
        if graphs and host.cuda_graphs:
            return np.maximum(t, serial) if host.async_scheduling else t + serial
        launch = host.launches(self.model.num_hidden_layers if layers is None else layers)
        return serial + np.maximum(t, launch) if host.launch_overlaps_device else serial + t + launch


def sparse_terms(rows, context, share: float, kv_heads, block_size: int = 16, min_blocks: int = DEFAULT_MIN_BLOCKS):
    """(rows, summary blocks scored, KV tokens read) of a sparse decode call over rows of `context`
    tokens: each KV head scores all of a row's blocks and reads what the engine's budget rule
    (fapool.sparse.selection.budget_blocks) gives a `share` of them."""
    nb = math.ceil(context / block_size)
    sel = int(budget_blocks(torch.tensor([share]), nb, min_blocks)[0])
    return rows, rows * kv_heads * nb, rows * kv_heads * sel * block_size


def kv_capacity_tokens(free_bytes: float, kv_bytes_per_token: float) -> int:
    """Tokens of KV that fit in `free_bytes` (0 when nothing fits)."""
    return max(0, math.floor(free_bytes / kv_bytes_per_token))
