"""8-bit KV caches: the cache dtype, the scales, and the FP8 scales' calibration.

FP8, as vLLM's `kv_cache_dtype="fp8"`: each layer stores K / scale_k and V / scale_v as e4m3
(saturated at +-448) and readers multiply back. A scale is one float per layer and tensor, so
it folds into the softmax scale (K) and the output (V) at no cost in the kernels. Scales are
calibrated once at start-up from a forward pass in the model's own dtype: the layer's largest
|K| and |V| map to FP8_MAX / HEADROOM, so later tokens up to HEADROOM times larger still fit,
while the smallest values that matter stay in e4m3's normal range (max / 2^15 and up).

INT8, as LMDeploy's and TensorRT-LLM's int8 KV: each token's K and V rows of a KV head are
stored as round(x / s) with s = max|x| / 127 of that row, the float32 s in scale pages beside
the cache ([blocks, kv heads, block_size]: a KV head's tokens of a page side by side, so a decode
tile reads its scales in one or two sectors; `KVScales.k_pages` / `v_pages`). e4m3 keeps 3
mantissa bits per element, which on small models costs the logits' ranking (K's error); int8
over a row's own range keeps the large elements, which dominate q.k, to 1/254 of the row's
largest. Readers multiply each token's logit by its K scale and its probability by its V scale.

Before K is quantized (int8 or FP8), each channel's mean over tokens (`KVScales.k_shift`, per
layer and KV head, from the start-up calibration pass) is subtracted, as SageAttention smooths
K, and FP8's K scale covers the shifted range: q.(k - mu) differs from q.k by the same q.mu for
every key of a query, so softmax and the output are unchanged, while the channels whose sign
and size hold across tokens no longer set the range. Readers need no change; the lse they return
is that of the shifted logits, which still merges with any other part read from the same cache.
"""

from __future__ import annotations

import torch

from fapool.attention.backend import AttentionBackend, KVScales

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
HEADROOM = 4.0
INT8_MAX = 127.0


def is_fp8(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype in ("fp8", "fp8_e4m3")


def cache_dtype(model_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """The dtype the KV cache is allocated in: the model's ("auto"), e4m3 or int8."""
    if kv_cache_dtype == "int8":
        return torch.int8
    return FP8_DTYPE if is_fp8(kv_cache_dtype) else model_dtype


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in the cache dtype, saturated to e4m3's range (identity cast otherwise)."""
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(dtype)


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 rows, float32 scales [...]): each row over its own max |x| / 127,
    rounded half up (as the Triton write kernel rounds); an all-zero row gets scale 0."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))
    q = torch.floor(xf * inv[..., None] + 0.5).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def scale_pages(cache_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    """The scale pages' shape for an int8 cache of [blocks, block_size, kv heads, head_dim]."""
    return (cache_shape[0], cache_shape[2], cache_shape[1])


def _is_f32(x: torch.Tensor, shape: tuple[int, ...]) -> bool:
    return tuple(x.shape) == shape and x.dtype == torch.float32 and x.is_contiguous()


def check_scale_pages(cache: torch.Tensor, k_pages: torch.Tensor | None, v_pages: torch.Tensor | None) -> None:
    """An int8 cache's scale pages are given, contiguous float32 of scale_pages' shape (the
    kernels address both alike)."""
    want = scale_pages(cache.shape)
    if any(pages is None or not _is_f32(pages, want) for pages in (k_pages, v_pages)):
        raise ValueError(f"an int8 cache needs k_pages and v_pages: contiguous float32 of shape {want}")


def check_shift(cache: torch.Tensor, k_shift: torch.Tensor | None) -> None:
    """K's shift, when there is one, is contiguous float32 [kv heads, head_dim]."""
    if k_shift is not None and not _is_f32(k_shift, tuple(cache.shape[2:])):
        raise ValueError(f"k_shift must be contiguous float32 of shape {tuple(cache.shape[2:])}, got {tuple(k_shift.shape)}")


def quantize_int8_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole float cache as an int8 cache and its scale pages (tests, benchmarks)."""
    q, s = quantize_int8_rows(cache)
    return q, s.transpose(1, 2).contiguous()


def dequantize_int8_cache(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """An int8 cache's values in float32: each row times its token's scale."""
    return cache.float() * pages.transpose(1, 2)[..., None]


class _KVObserver(AttentionBackend):
    """Wraps a layer's backend during calibration: records the largest |V| it writes, and K's
    sum, min and max over tokens per KV head and channel."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.v_amax = 0.0
        self.k_sum: torch.Tensor | None = None
        self.k_min: torch.Tensor | None = None
        self.k_max: torch.Tensor | None = None
        self.tokens = 0

    def write_kv(self, k_cache, v_cache, key, value, slot_mapping, scales=None) -> None:
        self.v_amax = max(self.v_amax, float(value.abs().max()))
        k = key.float()
        k_sum, k_min, k_max = k.sum(0), k.amin(0), k.amax(0)
        if self.k_sum is not None:
            k_sum, k_min, k_max = self.k_sum + k_sum, torch.minimum(self.k_min, k_min), torch.maximum(self.k_max, k_max)
        self.k_sum, self.k_min, self.k_max = k_sum, k_min, k_max
        self.tokens += key.shape[0]
        self.inner.write_kv(k_cache, v_cache, key, value, slot_mapping, scales)

    def forward(self, query, k_cache, v_cache, meta, scale, scales=None, new_kv=None):
        return self.inner.forward(query, k_cache, v_cache, meta, scale, scales, new_kv)


def scale_for(amax: float) -> float:
    return max(amax, 1e-6) * HEADROOM / FP8_MAX


def calibrate_kv_scales(attention_layers: list, run_forward, kv_cache_dtype: str = "fp8") -> list[KVScales]:
    """Per-layer scales from one forward: `run_forward()` runs the model over calibration
    tokens with a full-precision cache while each layer's backend is observed. FP8: the layers'
    K and V scales; int8: K's channel means (the scale pages come with the cache). The layers'
    `kv_scales` are set and returned."""
    observers = []
    for attn in attention_layers:
        observers.append(_KVObserver(attn.backend))
        attn.backend = observers[-1]
    try:
        run_forward()
    finally:
        for attn, obs in zip(attention_layers, observers):
            attn.backend = obs.inner
    scales = []
    for o in observers:
        shift = (o.k_sum / max(o.tokens, 1)).contiguous()
        if kv_cache_dtype == "int8":
            scales.append(KVScales(k_shift=shift))
        else:  # K's scale over the shifted range
            k_amax = float(torch.maximum(o.k_max - shift, shift - o.k_min).max())
            scales.append(KVScales(scale_for(k_amax), scale_for(o.v_amax), k_shift=shift))
    for attn, s in zip(attention_layers, scales):
        attn.kv_scales = s
    return scales
