/* Paged decode attention on the CPU (AVX-512): one query token per sequence, every key of its
 * block table visible. Reads the paged cache in place (no gather); each (sequence, KV head)
 * item keeps its G query heads and their accumulators in vector registers, and runs an online
 * softmax over the sequence's 16-key blocks. Built by cpu_decode.py through fapool/native.py
 * with -O3 -march=native -fopenmp; called through ctypes, one call per layer for the batch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#include <immintrin.h>
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
#define CHUNKS (MAX_D / 16)

/* 16 elements (fewer where `mask` says) of a bf16 or float32 cache row, as float32. */
static inline __attribute__((always_inline)) __m512 load16(const void *cache, int bf16, int64_t offset, __mmask16 mask) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)cache + offset);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)cache + offset);
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

/* exp(x) for x <= 0 (scores minus their running max), 16 at a time: 2^t = 2^round(t) * 2^f
 * with |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (relative error ~1e-8). */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, r), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* Blocks [b0, b1) of one sequence for KV head h: q [G, D] float32 already scaled, out [G, D],
 * lse [G]. Per block of <= 16 keys: each key's G partial dot products as vectors, summed 16 keys
 * at a time by reduce16; an online softmax over the block's scores; then P @ V. */
static inline __attribute__((always_inline)) void attend_head(
    const float *q, const void *k_cache, const void *v_cache, int bf16, const int32_t *table, int len, int b0,
    int b1, int H, int h, int G, int D, int bs, float *out, float *lse) {
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
    for (int b = b0; b < b1; b++) {
        const int64_t base = (int64_t)table[b] * bs;
        const int ntok = len - b * bs < bs ? len - b * bs : bs;
        const __mmask16 valid = (__mmask16)((1u << ntok) - 1);
        for (int j = 0; j < MAX_BS; j++) {
            if (j >= ntok) {
                for (int g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps();
                continue;
            }
            const int64_t row = ((base + j) * H + h) * D;
            __m512 dot[MAX_G];
            for (int c = 0; c < nc; c++) {
                __m512 k = load16(k_cache, bf16, row + c * 16, c == nc - 1 ? tail : 0xffff);
                for (int g = 0; g < G; g++) dot[g] = c ? _mm512_fmadd_ps(qv[g][c], k, dot[g]) : _mm512_mul_ps(qv[g][c], k);
            }
            for (int g = 0; g < G; g++) part[g][j] = dot[g];
        }
        __m512 p[MAX_G];
        for (int g = 0; g < G; g++) {
            __m512 s = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), reduce16(part[g]));
            float mx = fmaxf(m[g], _mm512_reduce_max_ps(s));
            float corr = m[g] == -INFINITY ? 0.0f : expf(m[g] - mx);
            p[g] = _mm512_maskz_mov_ps(valid, exp_nonpos(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
            l[g] = l[g] * corr + _mm512_reduce_add_ps(p[g]);
            m[g] = mx;
            if (corr != 1.0f)
                for (int c = 0; c < nc; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], _mm512_set1_ps(corr));
        }
        float pj[MAX_G][MAX_BS];
        for (int g = 0; g < G; g++) _mm512_storeu_ps(pj[g], p[g]);
        for (int j = 0; j < ntok; j++) {
            const int64_t row = ((base + j) * H + h) * D;
            for (int c = 0; c < nc; c++) {
                __m512 v = load16(v_cache, bf16, row + c * 16, c == nc - 1 ? tail : 0xffff);
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

/* q/out [n, H, G, D] float32, lse [n, H, G]; caches [num_blocks, bs, H, D] bf16 (bf16 != 0)
 * or float32; tables int32 [n, table_stride]; lens int32 [n], each > 0. Each sequence's blocks
 * are split into up to `parts` ranges (flash-decoding: fewer sequences than threads), merged by
 * their lse. Returns 0, -1 for sizes it was not built for (or no AVX-512), -2 out of memory. */
int fapool_decode_attention(const float *q, const void *k_cache, const void *v_cache, int bf16,
                            const int32_t *tables, int table_stride, const int32_t *lens,
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
        /* Common head sizes and group sizes as constants: the loops over them unroll into registers. */
#define ATTEND(DD, GG) attend_head(qh, k_cache, v_cache, 1, table, lens[seq], b0, b1, H, h, GG, DD, bs, o, l)
        if (bf16 && D == 64 && G == 3)
            ATTEND(64, 3);
        else if (bf16 && D == 64 && G == 4)
            ATTEND(64, 4);
        else if (bf16 && D == 128 && G == 4)
            ATTEND(128, 4);
        else if (bf16 && D == 128 && G == 8)
            ATTEND(128, 8);
        else
            attend_head(qh, k_cache, v_cache, bf16, table, lens[seq], b0, b1, H, h, G, D, bs, o, l);
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
    (void)q; (void)k_cache; (void)v_cache; (void)bf16; (void)tables; (void)table_stride; (void)lens;
    (void)n; (void)H; (void)G; (void)D; (void)bs; (void)out; (void)lse; (void)parts;
    return -1;
#endif
}
