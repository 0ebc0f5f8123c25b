"""The whole sampler in one Triton launch: one program per row, a few passes over its logits,
no sort. fapool.layers.sampler's torch code is the reference (same thresholds, same hash).

Per row:
  1. the max and argmax (greedy rows stop here; a NaN makes the row -1);
  2. top-k, when set: its threshold in the logits' order-preserving int32 keys, by the radix
     search of fapool.sparse.triton_select (the largest key with count(key >= t) >= k: the sign,
     then one bit a pass);
  3. the draw: Gumbel-max over the tokens min-p and top-k keep, the noise from the counter hash;
     the same pass sums the kept tokens' mass;
  4. top-p, when set, by rejection instead of a sort: the kept set is an upper set in logit
     order, so the drawn token j is in it iff the mass of tokens above x_j is below
     top_p * total; if not, every token up to x_j is out, and the draw is repeated (same
     noise) over what is left. With the same noise, argmax over the remaining set equals
     argmax over the top-p set once the winner is inside it: the reference's exact token.
     One round almost always (a drawn token falls outside with probability 1 - top_p).

A decode batch has fewer rows than the GPU has SMs, and one program a row leaves most of them
idle while step 3 (a hash and two logs a token) runs. So where rows are few, a first launch
splits each row into chunks, one program each: the chunk's max, argmax and NaN flag, and for a
row that filters by top-p alone (no top-k, no min-p) the chunk's draw winner and its mass
(relative to the chunk's max). The row's program then reads those partials instead of passes 1
and 3 of its first round; the winner is the same token, the mass differs only in summation
order. Other rows, and rejected top-p rounds, run the passes as above.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fapool.layers.sampling_batch import MUL_A, MUL_B, SamplingBatch
from fapool.layers.triton_pdl import launch_dependents, pdl_enabled, pdl_launch, wait_predecessor

BLOCK = 2048  # vocab entries a loop turn
# A program (one row) takes a whole SM's worth of warps: a decode batch has fewer rows than the
# GPU has SMs, so the row's passes over the vocabulary are latency-bound and more warps split them.
NUM_WARPS = 32
CHUNK_WARPS = 16
PART_FIELDS = 8  # a chunk's partials: max, argmax, NaN, mass, best score, best index (padded)
MAX_ROUNDS = 64  # top-p rejection rounds before falling back to the top token (never in practice)
INT_MIN = tl.constexpr(-(2**31))


@triton.jit
def _mix32(x, MUL_A: tl.constexpr, MUL_B: tl.constexpr):
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, MUL_A, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, MUL_B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _key(x):
    """int32 keys in the order of the float32 values."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _tile(x_row, start, offs, vocab):
    """Tile `start` of a row: its positions and float32 logits (-inf past the vocabulary)."""
    idx = start + offs
    return idx, tl.load(x_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)


@triton.jit
def _count_at_least(x_row, offs, vocab, threshold, BLOCK: tl.constexpr):
    """How many of the row's logits have a key >= threshold."""
    lane_n = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx, x = _tile(x_row, start, offs, vocab)
        lane_n += ((idx < vocab) & (_key(x) >= threshold)).to(tl.int32)
    return tl.sum(lane_n, 0)


@triton.jit
def _hash_keys(seed, counter, MUL_A: tl.constexpr, MUL_B: tl.constexpr):
    """Row keys of the hash (fapool.layers.sampler.row_keys)."""
    lo = seed.to(tl.uint32)  # int64 -> uint32 keeps the low 32 bits
    hi = (seed >> 32).to(tl.uint32)
    c = counter.to(tl.uint32)
    key_a = _mix32(_mix32(c ^ lo, MUL_A, MUL_B) ^ hi, MUL_A, MUL_B)
    c2 = c + tl.full([], 0x9E3779B9, tl.uint32)
    key_b = _mix32(_mix32(c2 ^ hi, MUL_A, MUL_B) ^ lo ^ tl.full([], 0x85EBCA6B, tl.uint32), MUL_A, MUL_B)
    return key_a, key_b


@triton.jit
def _gumbel_score(x, idx, inv_t, key_a, key_b, MUL_A: tl.constexpr, MUL_B: tl.constexpr):
    """x / T plus the token's Gumbel noise from the counter hash."""
    h = _mix32(_mix32(idx.to(tl.uint32) ^ key_a, MUL_A, MUL_B) ^ key_b, MUL_A, MUL_B)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return x * inv_t - tl.log(-tl.log(u))


@triton.jit
def _chunk_kernel(
    X,
    stride_x,
    vocab,
    chunk,
    INTS,
    stride_i,
    FLOATS,
    stride_f,
    PART,
    MUL_A: tl.constexpr,
    MUL_B: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    x_row = X + row.to(tl.int64) * stride_x
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    offs = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_arg = tl.zeros([BLOCK], tl.int32)
    lane_nan = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        idx, x = _tile(x_row, start, offs, hi)
        lane_nan = tl.maximum(lane_nan, (x != x).to(tl.int32))  # noqa: PLR0124 - NaN
        x = tl.where(x != x, float("-inf"), x)  # noqa: PLR0124 - NaN
        lane_arg = tl.where(x > lane_max, idx, lane_arg)
        lane_max = tl.maximum(x, lane_max)
    m = tl.max(lane_max, 0)
    arg = tl.min(tl.where(lane_max == m, lane_arg, vocab), 0)
    nan = tl.max(lane_nan, 0)
    temp = tl.load(FLOATS + row)
    mass = tl.full([], 0.0, tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32) + vocab
    top_p_only = (temp > 0) & (tl.load(FLOATS + 2 * stride_f + row) <= 0) & (tl.load(INTS + row) >= vocab)
    if top_p_only & (nan == 0):
        inv_t = 1.0 / temp
        key_a, key_b = _hash_keys(
            tl.load(INTS + stride_i + row), tl.load(INTS + 2 * stride_i + row), MUL_A, MUL_B
        )
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        part = tl.zeros([BLOCK], tl.float32)
        lane_best = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_i = tl.zeros([BLOCK], tl.int32)
        for start in range(lo, hi, BLOCK):
            idx, x = _tile(x_row, start, offs, hi)
            kept = idx < hi
            part += tl.where(kept, tl.exp((x - m_safe) * inv_t), 0.0)
            score = tl.where(kept, _gumbel_score(x, idx, inv_t, key_a, key_b, MUL_A, MUL_B), float("-inf"))
            lane_i = tl.where(score > lane_best, idx, lane_i)
            lane_best = tl.maximum(score, lane_best)
        mass = tl.sum(part, 0)
        best = tl.max(lane_best, 0)
        best_i = tl.min(tl.where(lane_best == best, lane_i, vocab), 0)
    out = PART + (row * tl.num_programs(1) + c) * 8
    tl.store(out, m)
    tl.store(out + 1, arg.to(tl.float32))  # token ids < 2**24: exact
    tl.store(out + 2, nan.to(tl.float32))
    tl.store(out + 3, mass)
    tl.store(out + 4, best)
    tl.store(out + 5, best_i.to(tl.float32))


@triton.jit
def _draw(
    x_row,
    offs,
    vocab,
    x_max,
    inv_t,
    t_min,
    k_thr,
    excl,
    rnd,
    total,
    key_a,
    key_b,
    MUL_A: tl.constexpr,
    MUL_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One draw over the kept tokens above `excl` -> (score, token, mass of the kept set, summed
    in round 0 only)."""
    lane_best = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_i = tl.zeros([BLOCK], tl.int32)
    part = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        idx, x = _tile(x_row, start, offs, vocab)
        key = _key(x)
        kept = (idx < vocab) & (x >= t_min) & (key >= k_thr)
        if rnd == 0:
            part += tl.where(kept, tl.exp((x - x_max) * inv_t), 0.0)
        score = tl.where(
            kept & (key > excl), _gumbel_score(x, idx, inv_t, key_a, key_b, MUL_A, MUL_B), float("-inf")
        )
        lane_i = tl.where(score > lane_best, idx, lane_i)
        lane_best = tl.maximum(score, lane_best)
    if rnd == 0:
        total = tl.sum(part, 0)
    best = tl.max(lane_best, 0)
    return best, tl.min(tl.where(lane_best == best, lane_i, vocab), 0).to(tl.int64), total


@triton.jit
def _from_partials(part_row, c_mask, c_max, x_max, inv_t, vocab):
    """A top-p-only row's first round from its chunks: (mass, score, token); the first token of
    the highest score, as the one-program pass picks it."""
    c_mass = tl.load(part_row + 3, mask=c_mask, other=0.0)
    total = tl.sum(tl.where(c_mask, c_mass * tl.exp((c_max - x_max) * inv_t), 0.0), 0)
    c_best = tl.load(part_row + 4, mask=c_mask, other=float("-inf"))
    best = tl.max(c_best, 0)
    c_best_i = tl.load(part_row + 5, mask=c_mask, other=0.0).to(tl.int32)
    return total, best, tl.min(tl.where(c_mask & (c_best == best), c_best_i, vocab), 0).to(tl.int64)


@triton.jit
def _sample_kernel(
    X,
    stride_x,
    vocab,
    INTS,
    stride_i,
    FLOATS,
    stride_f,
    OUT,
    PART,
    num_chunks,
    MUL_A: tl.constexpr,
    MUL_B: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_ROUNDS: tl.constexpr,
    HAS_PART: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    launch_dependents(USE_PDL)
    wait_predecessor(USE_PDL)
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    top_k = tl.load(INTS + row)
    seed = tl.load(INTS + stride_i + row)
    counter = tl.load(INTS + 2 * stride_i + row)
    temp = tl.load(FLOATS + row)
    top_p = tl.load(FLOATS + stride_f + row)
    min_p = tl.load(FLOATS + 2 * stride_f + row)
    offs = tl.arange(0, BLOCK)

    # Running values are kept per lane across the loop's tiles and reduced once at the end: a
    # block-wide reduction a tile would cost more than the tile's work.
    # 1. max, argmax (the first maximum, as torch.argmax), NaN
    if HAS_PART:  # from the chunks' partials (chunks in order: the first maximum's chunk first)
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < num_chunks
        part_row = PART + (row * num_chunks + offs_c) * 8
        c_max = tl.load(part_row, mask=c_mask, other=float("-inf"))
        x_max = tl.max(c_max, 0)
        c_arg = tl.load(part_row + 1, mask=c_mask, other=0.0).to(tl.int32)
        arg = tl.min(tl.where(c_mask & (c_max == x_max), c_arg, vocab), 0).to(tl.int64)
        nan = tl.max(tl.load(part_row + 2, mask=c_mask, other=0.0), 0).to(tl.int32)
    else:
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_arg = tl.zeros([BLOCK], tl.int32)
        lane_nan = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            idx, x = _tile(x_row, start, offs, vocab)
            lane_nan = tl.maximum(lane_nan, (x != x).to(tl.int32))  # noqa: PLR0124 - NaN
            x = tl.where(x != x, float("-inf"), x)  # noqa: PLR0124 - NaN
            lane_arg = tl.where(x > lane_max, idx, lane_arg)
            lane_max = tl.maximum(x, lane_max)
        x_max = tl.max(lane_max, 0)
        arg = tl.min(tl.where(lane_max == x_max, lane_arg, vocab), 0).to(tl.int64)
        nan = tl.max(lane_nan, 0)
    out = arg
    if (temp > 0) & (nan == 0):
        inv_t = 1.0 / temp
        t_min = tl.where(min_p > 0, x_max + temp * tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
        # 2. top-k: the largest key t with count(key >= t) >= k
        k_thr = tl.full([], INT_MIN, tl.int32)
        if top_k < vocab:
            k_thr = tl.where(_count_at_least(x_row, offs, vocab, 0, BLOCK) >= top_k, 0, INT_MIN)
            for b in range(31):
                trial = k_thr + (1 << (30 - b))
                k_thr = tl.where(_count_at_least(x_row, offs, vocab, trial, BLOCK) >= top_k, trial, k_thr)
        key_a, key_b = _hash_keys(seed, counter, MUL_A, MUL_B)
        # 3. + 4. draw, then reject while the winner is outside the top-p set
        excl = tl.full([], INT_MIN, tl.int32)  # keys up to this are out (top-p rejections)
        total = tl.full([], 0.0, tl.float32)
        rnd = tl.full([], 0, tl.int32)
        going = tl.full([], 1, tl.int32)
        while going != 0:
            from_chunks: tl.constexpr = False  # a top-p-only row's first round: the chunks drew it
            if HAS_PART:
                from_chunks = (min_p <= 0) & (top_k >= vocab) & (rnd == 0)
            if from_chunks:
                total, _best, best_i = _from_partials(part_row, c_mask, c_max, x_max, inv_t, vocab)
            else:
                _best, best_i, total = _draw(
                    x_row,
                    offs,
                    vocab,
                    x_max,
                    inv_t,
                    t_min,
                    k_thr,
                    excl,
                    rnd,
                    total,
                    key_a,
                    key_b,
                    MUL_A,
                    MUL_B,
                    BLOCK,
                )
            out = best_i
            going = tl.full([], 0, tl.int32)
            if top_p < 1.0:
                x_best = tl.load(x_row + best_i).to(tl.float32)
                above = tl.zeros([BLOCK], tl.float32)
                for start in range(0, vocab, BLOCK):
                    idx, x = _tile(x_row, start, offs, vocab)
                    kept = (idx < vocab) & (x >= t_min) & (_key(x) >= k_thr) & (x > x_best)
                    above += tl.where(kept, tl.exp((x - x_max) * inv_t), 0.0)
                mass_above = tl.sum(above, 0)
                # The winner is outside (the top token never is, even when top_p * total
                # underflows to 0): exclude everything up to it.
                if (mass_above > 0) & (mass_above >= top_p * total):
                    excl = _key(x_best)
                    rnd += 1
                    going = tl.where(rnd >= MAX_ROUNDS, 0, 1)
                    out = tl.where(rnd >= MAX_ROUNDS, arg, out)
    out = tl.where(nan != 0, -1, out)
    tl.store(OUT + row, out)


@functools.lru_cache(maxsize=256)
def _chunks(n: int, vocab: int, num_sms: int) -> int:
    return max(1, min(triton.cdiv(vocab, BLOCK), num_sms // n))


def chunks_per_row(n: int, vocab: int, device: torch.device) -> int:
    """Chunks a row's first passes split into: about one program an SM, a tile at least each;
    1 (no chunk launch) once the rows alone fill the SMs."""
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
        return _chunks(n, vocab, 132)
    return _chunks(n, vocab, torch.cuda.get_device_properties(device).multi_processor_count)


def sample_triton(logits: torch.Tensor, batch: SamplingBatch, num_chunks: int | None = None) -> torch.Tensor:
    """sample_tokens on CUDA: logits [N, V] (unit stride in V) -> tokens [N] int64, -1 for a
    row with a NaN. Graph-safe: no host sync, one launch."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        pdl = pdl_enabled(logits)
        num_chunks = num_chunks or chunks_per_row(n, vocab, logits.device)
        part = logits  # unused without chunks
        if num_chunks > 1:
            chunk = triton.cdiv(triton.cdiv(vocab, num_chunks), BLOCK) * BLOCK
            num_chunks = triton.cdiv(vocab, chunk)
            part = torch.empty((n, num_chunks, PART_FIELDS), dtype=torch.float32, device=logits.device)
            _chunk_kernel[(n, num_chunks)](
                logits,
                logits.stride(0),
                vocab,
                chunk,
                batch.ints,
                batch.ints.stride(0),
                batch.floats,
                batch.floats.stride(0),
                part,
                MUL_A=MUL_A,
                MUL_B=MUL_B,
                BLOCK=BLOCK,
                USE_PDL=pdl,
                num_warps=CHUNK_WARPS,
                **pdl_launch(pdl),
            )
        _sample_kernel[(n,)](
            logits,
            logits.stride(0),
            vocab,
            batch.ints,
            batch.ints.stride(0),
            batch.floats,
            batch.floats.stride(0),
            out,
            part,
            num_chunks,
            MUL_A=MUL_A,
            MUL_B=MUL_B,
            BLOCK=BLOCK,
            MAX_ROUNDS=MAX_ROUNDS,
            HAS_PART=num_chunks > 1,
            BLOCK_C=triton.next_power_of_2(num_chunks),
            USE_PDL=pdl,
            num_warps=NUM_WARPS,
            **pdl_launch(pdl),
        )
    return out
