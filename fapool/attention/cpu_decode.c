/* Paged decode attention on the CPU (AVX-512): one query token per sequence, every key of its
 * block table visible. Reads the paged cache in place (no gather); each (sequence, KV head)
 * item keeps its G query heads and their accumulators in vector registers, and runs an online
 * softmax over the sequence's 16-key blocks. Built by cpu_decode.py through fapool/native.py
 * with -O3 -march=native -fopenmp; called through ctypes, one call per layer for the batch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define HAVE_KERNEL 1
#else
#define HAVE_KERNEL 0
#endif

#define MAX_D 256
#define MAX_G 16 /* query heads per KV head */
#define MAX_BS 16 /* keys per block: one vector of scores */
#define MAX_PARTS 64

int fapool_decode_supported(void) { return HAVE_KERNEL; }

#if HAVE_KERNEL
#include "../simd.h"

#define CHUNKS (MAX_D / 16)

enum { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 }; /* cache element kinds */

/* 16 elements (fewer where `mask` says) of a float32, bf16 or int8 cache row, as float32 (an
 * int8 row unscaled: its token's scale applies to the score or the probability). */
static inline __attribute__((always_inline)) __m512 load16(const void *cache, int kind, int64_t offset, __mmask16 mask) {
    if (kind == KV_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, (const int8_t *)cache + offset)));
    return kind == KV_BF16 ? load_bf16((const uint16_t *)cache + offset, mask)
                           : _mm512_maskz_loadu_ps(mask, (const float *)cache + offset);
}

/* Lane i = the sum of v[i]'s lanes: a transpose-and-add tree, 45 instructions for 16 sums. */
static inline __m512 reduce16(const __m512 *v) {
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(w[2 * i]), y = _mm512_castps_pd(w[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xdd));
}

/* Blocks [b0, b1) of one sequence for KV head h: q [G, D] float32 already scaled, out [G, D],
 * lse [G]. Per block of <= 16 keys: each key's G partial dot products as vectors, summed 16 keys
 * at a time by reduce16; an online softmax over the block's scores; then P @ V. An int8 cache's
 * per-token scales (ks / vs: [num_blocks, H, bs] float32, a block's keys of a head side by side)
 * multiply the block's scores and, for P @ V only, its probabilities. */
static inline __attribute__((always_inline)) void attend_head(
    const float *q, const void *k_cache, const void *v_cache, int kind, const float *ks, const float *vs,
    const int32_t *table, int len, int b0, int b1, int H, int h, int G, int D, int bs, float *out, float *lse) {
    const int nc = (D + 15) / 16;
    const __mmask16 tail = (D % 16) ? (__mmask16)((1u << (D % 16)) - 1) : (__mmask16)0xffff;
    __m512 qv[MAX_G][CHUNKS], acc[MAX_G][CHUNKS], part[MAX_G][MAX_BS];
    float m[MAX_G], l[MAX_G];
    for (int g = 0; g < G; g++) {
        for (int c = 0; c < nc; c++) {
            qv[g][c] = _mm512_maskz_loadu_ps(c == nc - 1 ? tail : 0xffff, q + g * D + c * 16);
            acc[g][c] = _mm512_setzero_ps();
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const int row_bytes = D * (kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1);
    for (int b = b0; b < b1; b++) {
        const int64_t base = (int64_t)table[b] * bs;
        const int ntok = len - b * bs < bs ? len - b * bs : bs;
        const __mmask16 valid = (__mmask16)((1u << ntok) - 1);
        if (b + 1 < b1) { /* the next block's rows of this head: its page is elsewhere in memory */
            const int64_t next = ((int64_t)table[b + 1] * bs * H + h) * D;
            for (int j = 0; j < bs; j++)
                for (int off = 0; off < row_bytes; off += 64) {
                    _mm_prefetch((const char *)k_cache + (next + (int64_t)j * H * D) * (row_bytes / D) + off, _MM_HINT_T0);
                    _mm_prefetch((const char *)v_cache + (next + (int64_t)j * H * D) * (row_bytes / D) + off, _MM_HINT_T0);
                }
        }
        for (int j = 0; j < MAX_BS; j++) {
            if (j >= ntok) {
                for (int g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps();
                continue;
            }
            const int64_t row = ((base + j) * H + h) * D;
            __m512 dot[MAX_G];
            for (int c = 0; c < nc; c++) {
                __m512 k = load16(k_cache, kind, row + c * 16, c == nc - 1 ? tail : 0xffff);
                for (int g = 0; g < G; g++) dot[g] = c ? _mm512_fmadd_ps(qv[g][c], k, dot[g]) : _mm512_mul_ps(qv[g][c], k);
            }
            for (int g = 0; g < G; g++) part[g][j] = dot[g];
        }
        __m512 p[MAX_G], ksv = _mm512_set1_ps(1.0f), vsv = ksv;
        if (kind == KV_INT8) {
            const int64_t at = ((int64_t)table[b] * H + h) * bs;
            ksv = _mm512_maskz_loadu_ps(valid, ks + at);
            vsv = _mm512_maskz_loadu_ps(valid, vs + at);
        }
        for (int g = 0; g < G; g++) {
            __m512 dots = reduce16(part[g]);
            if (kind == KV_INT8) dots = _mm512_mul_ps(dots, ksv);
            __m512 s = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), dots);
            float mx = fmaxf(m[g], _mm512_reduce_max_ps(s));
            float corr = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
            p[g] = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
            l[g] = l[g] * corr + _mm512_reduce_add_ps(p[g]);
            m[g] = mx;
            if (corr != 1.0f)
                for (int c = 0; c < nc; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], _mm512_set1_ps(corr));
        }
        float pj[MAX_G][MAX_BS];
        for (int g = 0; g < G; g++) _mm512_storeu_ps(pj[g], kind == KV_INT8 ? _mm512_mul_ps(p[g], vsv) : p[g]);
        for (int j = 0; j < ntok; j++) {
            const int64_t row = ((base + j) * H + h) * D;
            for (int c = 0; c < nc; c++) {
                __m512 v = load16(v_cache, kind, row + c * 16, c == nc - 1 ? tail : 0xffff);
                for (int g = 0; g < G; g++) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[g][j]), v, acc[g][c]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        __m512 inv = _mm512_set1_ps(1.0f / l[g]);
        for (int c = 0; c < nc; c++)
            _mm512_mask_storeu_ps(out + g * D + c * 16, c == nc - 1 ? tail : 0xffff, _mm512_mul_ps(acc[g][c], inv));
        lse[g] = m[g] + logf(l[g]);
    }
}
#endif

#if HAVE_KERNEL
#define QT 16 /* query tokens per prefill item */

/* r[i] lane j <- r[j] lane i: a 16 x 16 transpose in 64 shuffles. */
static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* An int8 cache row of D elements as bf16 (exact: |x| <= 127). */
static inline void widen_int8_row(uint16_t *dst, const int8_t *src, int D) {
    for (int c = 0; c < D; c += 16) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask(D - c), src + c)));
        _mm256_mask_storeu_epi16(dst + c, tail_mask(D - c), (__m256i)_mm512_cvtneps_pbh(f));
    }
}

/* Query tokens [t0, t1) of one sequence for KV head h (rows of G query heads each, q [T, H, G,
 * D] already scaled) over its keys at positions kv_start.. (causal: a key is seen from its own
 * position on), bf16 or int8 cache (an int8 block's rows are widened to bf16 first, its keys'
 * K scales multiply the scores and their V scales P for P @ V; ks / vs as in attend_head).
 * Per 16-key block, K goes in as pairs of head-dim elements
 * transposed once (the block's keys in the lanes: scores need no horizontal sums) and V as pairs
 * of keys interleaved (head-dim elements in the lanes); then for each token its G rows side by
 * side: scores, an online softmax update, P @ V. The products are bf16 dot products
 * (vdpbf16ps, twice the float32 FMA's multiplies), q and P rounded to bf16 for them as aten's
 * CPU flash kernel rounds them for a bf16 cache; sums stay float32. D even. */
static inline __attribute__((always_inline)) void prefill_tile_bf16(
    const float *q, const void *k_cache, const void *v_cache, int int8, const float *ks, const float *vs,
    const int32_t *table, int kv_len, int kv_start, int q_pos0, int t0, int t1, int H, int h, int G, int D, int bs,
    float *out, float *lse) {
    const int nc = (D + 15) / 16, np = D / 2, npc = (np + 15) / 16;
    float acc[QT * MAX_G][MAX_D] __attribute__((aligned(64)));
    uint32_t qb[QT * MAX_G][MAX_D / 2] __attribute__((aligned(64)));
    float m[QT * MAX_G];
    __m512 lsum[QT * MAX_G];
    __m512i kt[MAX_D / 2], vi[MAX_BS / 2][CHUNKS];
    uint16_t kbuf[MAX_BS][MAX_D] __attribute__((aligned(64))), vbuf[MAX_BS][MAX_D] __attribute__((aligned(64)));
    const uint16_t *krow[MAX_BS], *vrow[MAX_BS];
    __m512i lo_idx, hi_idx;
    {
        uint16_t lo[32], hi[32];
        for (int i = 0; i < 16; i++) {
            lo[2 * i] = (uint16_t)i, lo[2 * i + 1] = (uint16_t)(32 + i);
            hi[2 * i] = (uint16_t)(16 + i), hi[2 * i + 1] = (uint16_t)(48 + i);
        }
        lo_idx = _mm512_loadu_si512(lo), hi_idx = _mm512_loadu_si512(hi);
    }
    for (int t = t0; t < t1; t++)
        for (int g = 0; g < G; g++) {
            const int r = (t - t0) * G + g;
            const float *qr = q + (((int64_t)t * H + h) * G + g) * D;
            for (int c = 0; c < D; c += 32) {
                __m512 a = _mm512_maskz_loadu_ps(tail_mask(D - c), qr + c);
                __m512 b = _mm512_maskz_loadu_ps(tail_mask(D - c - 16), qr + c + 16);
                _mm512_storeu_si512(qb[r] + c / 2, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
            m[r] = -INFINITY;
            lsum[r] = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc[r] + c * 16, _mm512_setzero_ps());
        }
    int last = q_pos0 + t1 - kv_start; /* keys up to the last query's position */
    int nkeys = last < kv_len ? last : kv_len;
    for (int b = 0; b * bs < nkeys; b++) {
        const int64_t base = (int64_t)table[b] * bs;
        const int ntok = nkeys - b * bs < bs ? nkeys - b * bs : bs;
        __m512 ksv = _mm512_set1_ps(1.0f), vsv = ksv;
        for (int j = 0; j < ntok; j++) {
            const int64_t row = ((base + j) * H + h) * D;
            if (int8) {
                widen_int8_row(kbuf[j], (const int8_t *)k_cache + row, D);
                widen_int8_row(vbuf[j], (const int8_t *)v_cache + row, D);
                krow[j] = kbuf[j], vrow[j] = vbuf[j];
            } else {
                krow[j] = (const uint16_t *)k_cache + row, vrow[j] = (const uint16_t *)v_cache + row;
            }
        }
        if (int8) {
            const int64_t at = ((int64_t)table[b] * H + h) * bs;
            ksv = _mm512_maskz_loadu_ps(tail_mask(ntok), ks + at);
            vsv = _mm512_maskz_loadu_ps(tail_mask(ntok), vs + at);
        }
        for (int pc = 0; pc < npc; pc++) {
            __mmask16 cm = tail_mask(np - pc * 16);
            for (int j = 0; j < MAX_BS; j++)
                kt[pc * 16 + j] = j < ntok ? _mm512_maskz_loadu_epi32(cm, (const uint32_t *)krow[j] + pc * 16)
                                           : _mm512_setzero_si512();
            transpose16((__m512 *)(kt + pc * 16));
        }
        for (int jp = 0; jp < (ntok + 1) / 2; jp++) {
            const uint16_t *v0 = vrow[2 * jp], *v1 = 2 * jp + 1 < ntok ? vrow[2 * jp + 1] : v0;
            for (int c = 0; c < D; c += 32) {
                __mmask32 cm = D - c >= 32 ? 0xffffffffu : (__mmask32)((1u << (D - c)) - 1);
                __m512i a = _mm512_maskz_loadu_epi16(cm, v0 + c);
                __m512i bb = 2 * jp + 1 < ntok ? _mm512_maskz_loadu_epi16(cm, v1 + c) : _mm512_setzero_si512();
                vi[jp][c / 16] = _mm512_permutex2var_epi16(a, lo_idx, bb);
                if (c / 16 + 1 < nc) vi[jp][c / 16 + 1] = _mm512_permutex2var_epi16(a, hi_idx, bb);
            }
        }
        const int key0 = kv_start + b * bs, npairs = (ntok + 1) / 2;
        for (int t = t0; t < t1; t++) {
            int seen = q_pos0 + t - key0 + 1;
            if (seen <= 0) continue;
            const __mmask16 valid = (__mmask16)((1u << (seen < ntok ? seen : ntok)) - 1);
            const int r0 = (t - t0) * G;
            /* A token's G rows side by side: 2G independent dot-product chains, then G of P @ V. */
            __m512 sa[MAX_G], sb[MAX_G], corr[MAX_G];
            uint32_t pj[MAX_G][MAX_BS / 2];
            for (int g = 0; g < G; g++) sa[g] = sb[g] = _mm512_setzero_ps();
            int dp = 0;
            for (; dp + 1 < np; dp += 2)
                for (int g = 0; g < G; g++) {
                    sa[g] = dot_bcast(sa[g], (__m512bh)kt[dp], &qb[r0 + g][dp]);
                    sb[g] = dot_bcast(sb[g], (__m512bh)kt[dp + 1], &qb[r0 + g][dp + 1]);
                }
            for (int g = 0; g < G; g++) {
                const int r = r0 + g;
                if (dp < np) sa[g] = dot_bcast(sa[g], (__m512bh)kt[dp], &qb[r][dp]);
                __m512 dots = _mm512_add_ps(sa[g], sb[g]);
                if (int8) dots = _mm512_mul_ps(dots, ksv);
                __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), dots);
                float mx = fmaxf(m[r], _mm512_reduce_max_ps(sc));
                float cf = m[r] == -INFINITY ? 0.0f : expf(m[r] - mx);
                __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(mx))));
                m[r] = mx;
                corr[g] = _mm512_set1_ps(cf);
                lsum[r] = _mm512_fmadd_ps(lsum[r], corr[g], p);
                _mm256_storeu_si256((__m256i *)pj[g], (__m256i)_mm512_cvtneps_pbh(int8 ? _mm512_mul_ps(p, vsv) : p));
            }
            for (int c = 0; c < nc; c++) {
                __m512 a[MAX_G];
                for (int g = 0; g < G; g++) a[g] = _mm512_mul_ps(_mm512_loadu_ps(acc[r0 + g] + c * 16), corr[g]);
                for (int jp = 0; jp < npairs; jp++)
                    for (int g = 0; g < G; g++)
                        a[g] = dot_bcast(a[g], (__m512bh)vi[jp][c], &pj[g][jp]);
                for (int g = 0; g < G; g++) _mm512_storeu_ps(acc[r0 + g] + c * 16, a[g]);
            }
        }
    }
    for (int t = t0; t < t1; t++)
        for (int g = 0; g < G; g++) {
            const int r = (t - t0) * G + g;
            const int64_t o = ((int64_t)t * H + h) * G + g;
            float l = _mm512_reduce_add_ps(lsum[r]);
            __m512 inv = _mm512_set1_ps(1.0f / l);
            for (int c = 0; c < nc; c++)
                _mm512_mask_storeu_ps(out + o * D + c * 16, tail_mask(D - c * 16), _mm512_mul_ps(_mm512_loadu_ps(acc[r] + c * 16), inv));
            lse[o] = m[r] + logf(l);
        }
}
#endif

/* Multi-token rows (prefill chunks) of n sequences over a bf16 cache, every key causal: sequence s's q_len[s]
 * query tokens are rows q_start[s].. of q/out [T, H, G, D] float32 (q already scaled), at
 * positions q_pos0[s]..; its kv_len[s] keys sit at positions kv_start[s].. of its block table.
 * Every token must see at least one key. lse [T, H, G]. Returns 0, or -1 for sizes it was not
 * built for (or no AVX-512). */
static int prefill_impl(const float *q, const void *k_cache, const void *v_cache, int int8, const float *ks,
                        const float *vs, const int32_t *tables, int table_stride, int n, const int32_t *q_start,
                        const int32_t *q_len, const int32_t *q_pos0, const int32_t *kv_start, const int32_t *kv_len,
                        int H, int G, int D, int bs, float *out, float *lse);

int fapool_prefill_attention(const float *q, const void *k_cache, const void *v_cache, int bf16,
                             const int32_t *tables, int table_stride, int n, const int32_t *q_start,
                             const int32_t *q_len, const int32_t *q_pos0, const int32_t *kv_start,
                             const int32_t *kv_len, int H, int G, int D, int bs, float *out, float *lse) {
    if (!bf16) return -1;
    return prefill_impl(q, k_cache, v_cache, 0, NULL, NULL, tables, table_stride, n, q_start, q_len, q_pos0,
                        kv_start, kv_len, H, G, D, bs, out, lse);
}

/* fapool_prefill_attention over an int8 cache with its per-token scales ks / vs [num_blocks, H, bs]. */
int fapool_prefill_attention_int8(const float *q, const int8_t *k_cache, const int8_t *v_cache, const float *ks,
                                  const float *vs, const int32_t *tables, int table_stride, int n,
                                  const int32_t *q_start, const int32_t *q_len, const int32_t *q_pos0,
                                  const int32_t *kv_start, const int32_t *kv_len, int H, int G, int D, int bs,
                                  float *out, float *lse) {
    return prefill_impl(q, k_cache, v_cache, 1, ks, vs, tables, table_stride, n, q_start, q_len, q_pos0,
                        kv_start, kv_len, H, G, D, bs, out, lse);
}

static int prefill_impl(const float *q, const void *k_cache, const void *v_cache, int int8, const float *ks,
                        const float *vs, const int32_t *tables, int table_stride, int n, const int32_t *q_start,
                        const int32_t *q_len, const int32_t *q_pos0, const int32_t *kv_start, const int32_t *kv_len,
                        int H, int G, int D, int bs, float *out, float *lse) {
#if HAVE_KERNEL
    if (D > MAX_D || D % 2 || G > MAX_G || bs > MAX_BS) return -1;
    int items = 0;
    for (int s = 0; s < n; s++) items += (q_len[s] + QT - 1) / QT * H;
    /* (sequence, query tile, KV head) items, the longest tiles (the last ones) first. */
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
    for (int item = 0; item < items; item++) {
        int s = 0, rest = item;
        while (rest >= (q_len[s] + QT - 1) / QT * H) rest -= (q_len[s++] + QT - 1) / QT * H;
        int tiles = (q_len[s] + QT - 1) / QT, h = rest % H, tile = tiles - 1 - rest / H;
        int t0 = q_start[s] + tile * QT, t1 = t0 + QT < q_start[s] + q_len[s] ? t0 + QT : q_start[s] + q_len[s];
        const int32_t *table = tables + (int64_t)s * table_stride;
        /* positions are of the sequence's own tokens: shift q_pos0 so row t sits at q_pos0 + (t - q_start). */
        int pos0 = q_pos0[s] - q_start[s];
#define TILE(I8, GG, DD) \
    prefill_tile_bf16(q, k_cache, v_cache, I8, ks, vs, table, kv_len[s], kv_start[s], pos0, t0, t1, H, h, GG, DD, bs, out, lse)
        if (D == 64 && G == 3 && !int8)
            TILE(0, 3, 64);
        else if (D == 64 && G == 3)
            TILE(1, 3, 64);
        else if (!int8)
            TILE(0, G, D);
        else
            TILE(1, G, D);
#undef TILE
    }
    return 0;
#else
    (void)q; (void)k_cache; (void)v_cache; (void)int8; (void)ks; (void)vs; (void)tables; (void)table_stride; (void)n;
    (void)q_start; (void)q_len; (void)q_pos0; (void)kv_start; (void)kv_len; (void)H; (void)G; (void)D; (void)bs;
    (void)out; (void)lse;
    return -1;
#endif
}

static int decode_impl(const float *q, const void *k_cache, const void *v_cache, int kind, const float *ks,
                       const float *vs, const int32_t *tables, int table_stride, const int32_t *lens,
                       int n, int H, int G, int D, int bs, float *out, float *lse, int parts);

/* q/out [n, H, G, D] float32, lse [n, H, G]; caches [num_blocks, bs, H, D] bf16 (bf16 != 0)
 * or float32; tables int32 [n, table_stride]; lens int32 [n], each > 0. Each sequence's blocks
 * are split into up to `parts` ranges (flash-decoding: fewer sequences than threads), merged by
 * their lse. Returns 0, -1 for sizes it was not built for (or no AVX-512), -2 out of memory. */
int fapool_decode_attention(const float *q, const void *k_cache, const void *v_cache, int bf16,
                            const int32_t *tables, int table_stride, const int32_t *lens,
                            int n, int H, int G, int D, int bs, float *out, float *lse, int parts) {
    return decode_impl(q, k_cache, v_cache, bf16 ? KV_BF16 : KV_F32, NULL, NULL, tables, table_stride, lens, n, H, G,
                       D, bs, out, lse, parts);
}

/* fapool_decode_attention over an int8 cache, each token's K and V rows of a head scaled by
 * ks / vs [num_blocks, H, bs] float32 (fapool.attention.kv_quant). */
int fapool_decode_attention_int8(const float *q, const int8_t *k_cache, const int8_t *v_cache, const float *ks,
                                 const float *vs, const int32_t *tables, int table_stride, const int32_t *lens,
                                 int n, int H, int G, int D, int bs, float *out, float *lse, int parts) {
    return decode_impl(q, k_cache, v_cache, KV_INT8, ks, vs, tables, table_stride, lens, n, H, G, D, bs, out, lse,
                       parts);
}

static int decode_impl(const float *q, const void *k_cache, const void *v_cache, int kind, const float *ks,
                       const float *vs, const int32_t *tables, int table_stride, const int32_t *lens,
                       int n, int H, int G, int D, int bs, float *out, float *lse, int parts) {
#if HAVE_KERNEL
    if (D > MAX_D || G > MAX_G || bs > MAX_BS) return -1;
    const int R = H * G;
    if (parts < 1) parts = 1;
    float *part_out = out, *part_lse = lse;
    if (parts > 1) {
        part_out = malloc(sizeof(float) * (size_t)n * parts * R * D);
        part_lse = malloc(sizeof(float) * (size_t)n * parts * R);
        if (!part_out || !part_lse) {
            free(part_out);
            free(part_lse);
            return -2;
        }
    }
    /* (sequence, part, KV head) items over the threads of the OpenMP runtime torch already loaded (same soname). */
#pragma omp parallel for schedule(dynamic, 1) if (n * parts * H > 1)
    for (int item = 0; item < n * parts * H; item++) {
        int h = item % H, sp = item / H, seq = sp / parts, p = sp % parts;
        int nblocks = (lens[seq] + bs - 1) / bs;
        int np = parts < nblocks ? parts : nblocks;
        if (p >= np) continue;
        int b0 = (int)((int64_t)p * nblocks / np), b1 = (int)((int64_t)(p + 1) * nblocks / np);
        const float *qh = q + ((int64_t)seq * R + h * G) * D;
        int64_t po = (int64_t)sp * R + h * G;
        const int32_t *table = tables + (int64_t)seq * table_stride;
        float *o = part_out + po * D, *l = part_lse + po;
        /* Common kinds, head sizes and group sizes as constants: the loops over them unroll into registers. */
#define ATTEND(KK, DD, GG) attend_head(qh, k_cache, v_cache, KK, ks, vs, table, lens[seq], b0, b1, H, h, GG, DD, bs, o, l)
        if (kind == KV_BF16 && D == 64 && G == 3)
            ATTEND(KV_BF16, 64, 3);
        else if (kind == KV_F32 && D == 64 && G == 3)
            ATTEND(KV_F32, 64, 3);
        else if (kind == KV_INT8 && D == 64 && G == 3)
            ATTEND(KV_INT8, 64, 3);
        else if (kind == KV_F32 && D == 64 && G == 4)
            ATTEND(KV_F32, 64, 4);
        else if (kind == KV_BF16 && D == 64 && G == 4)
            ATTEND(KV_BF16, 64, 4);
        else if (kind == KV_BF16 && D == 128 && G == 4)
            ATTEND(KV_BF16, 128, 4);
        else if (kind == KV_BF16 && D == 128 && G == 8)
            ATTEND(KV_BF16, 128, 8);
        else
            attend_head(qh, k_cache, v_cache, kind, ks, vs, table, lens[seq], b0, b1, H, h, G, D, bs, o, l);
#undef ATTEND
    }
    if (parts == 1) return 0;
    for (int seq = 0; seq < n; seq++) {
        int nblocks = (lens[seq] + bs - 1) / bs;
        int np = parts < nblocks ? parts : nblocks;
        for (int r = 0; r < R; r++) {
            float mx = -INFINITY;
            for (int p = 0; p < np; p++) {
                float v = part_lse[((int64_t)seq * parts + p) * R + r];
                mx = v > mx ? v : mx;
            }
            float w[MAX_PARTS], total = 0.0f;
            for (int p = 0; p < np && p < MAX_PARTS; p++) {
                w[p] = expf(part_lse[((int64_t)seq * parts + p) * R + r] - mx);
                total += w[p];
            }
            float *dst = out + ((int64_t)seq * R + r) * D;
            for (int d = 0; d < D; d++) dst[d] = 0.0f;
            for (int p = 0; p < np && p < MAX_PARTS; p++) {
                const float *src = part_out + (((int64_t)seq * parts + p) * R + r) * D;
                float c = w[p] / total;
                for (int d = 0; d < D; d++) dst[d] += c * src[d];
            }
            lse[(int64_t)seq * R + r] = mx + logf(total);
        }
    }
    free(part_out);
    free(part_lse);
    return 0;
#else
    (void)q; (void)k_cache; (void)v_cache; (void)kind; (void)ks; (void)vs; (void)tables; (void)table_stride;
    (void)lens; (void)n; (void)H; (void)G; (void)D; (void)bs; (void)out; (void)lse; (void)parts;
    return -1;
#endif
}

/* The step's new K and V rows into the paged caches: token i's row (row_bytes, its KV heads
 * side by side) from key / value (token strides key_stride / value_stride bytes) to slot
 * slots[i] of each cache; slots < 0 are skipped. Plain copies: the caller checked that the
 * rows are already in the cache's dtype. */
void fapool_write_kv(char *k_cache, char *v_cache, const char *key, int64_t key_stride, const char *value,
                     int64_t value_stride, const int64_t *slots, int n, int64_t row_bytes) {
    for (int i = 0; i < n; i++) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + slots[i] * row_bytes, key + i * key_stride, (size_t)row_bytes);
        memcpy(v_cache + slots[i] * row_bytes, value + i * value_stride, (size_t)row_bytes);
    }
}
