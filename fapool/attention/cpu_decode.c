/* Paged decode attention on the CPU: one query token per sequence, every key of its block
 * table visible. Reads the paged cache in place (no gather); a token's K and V rows (all KV
 * heads, contiguous in the cache) are converted once for every query head; an online softmax
 * runs over the sequence's blocks. Built by cpu_decode.py with -O3 -march=native
 * -fopenmp; called through ctypes, one call per layer for the whole batch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 256
#define MAX_R 64   /* query rows of a sequence: heads */
#define MAX_ROW 2048 /* KV heads x head size of one token */
#define MAX_BS 64
#define MAX_PARTS 64

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* exp(x) for x <= 0 (a score minus its running max): 2^t = 2^round(t) * 2^f with |f| <= 1/2,
 * 2^f by its degree-7 Taylor polynomial (relative error ~1e-8); branch-free so loops vectorise. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float r = nearbyintf(t);
    float f = (t - r) * 0.6931471805599453f;
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t e = (int32_t)r + 127;
    uint32_t bits = (uint32_t)e << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

static inline __attribute__((always_inline)) void load_row(const void *cache, int bf16, int64_t offset, int D, float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
        for (int d = 0; d < D; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        memcpy(dst, (const float *)cache + offset, (size_t)D * sizeof(float));
    }
}

/* Blocks [b0, b1) of one sequence: q [R = H * G rows, D] already scaled, out [R, D], lse [R]. A token's keys
 * (all H heads) are one contiguous row of the cache, read once for every query row. */
static inline __attribute__((always_inline)) void attend_seq(
    const float *q, const void *k_cache, const void *v_cache, int bf16, const int32_t *table,
    int len, int b0, int b1, int H, int G, int D, int bs, float *out, float *lse) {
    const int R = H * G;
    float acc[MAX_R][MAX_D];
    float m[MAX_R], l[MAX_R];
    float s[MAX_R][MAX_BS];
    float row[MAX_ROW];
    for (int r = 0; r < R; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int d = 0; d < D; d++) acc[r][d] = 0.0f;
    }
    for (int b = b0; b < b1; b++) {
        int64_t base = (int64_t)table[b] * bs;
        int ntok = len - b * bs < bs ? len - b * bs : bs;
        for (int j = 0; j < ntok; j++) {
            load_row(k_cache, bf16, (base + j) * H * D, H * D, row);
            for (int r = 0; r < R; r++) {
                const float *qr = q + r * D, *kr = row + (r / G) * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qr[d] * kr[d];
                s[r][j] = dot;
            }
        }
        for (int r = 0; r < R; r++) {
            float mx = m[r];
            for (int j = 0; j < ntok; j++) mx = s[r][j] > mx ? s[r][j] : mx;
            float corr = exp_nonpos(m[r] - mx); /* the first block: exp(-inf) clamps to ~0 */
            m[r] = mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < ntok; j++) {
                float p = exp_nonpos(s[r][j] - mx);
                s[r][j] = p;
                sum += p;
            }
            l[r] = l[r] * corr + sum;
            if (corr != 1.0f) {
#pragma omp simd
                for (int d = 0; d < D; d++) acc[r][d] *= corr;
            }
        }
        for (int j = 0; j < ntok; j++) {
            load_row(v_cache, bf16, (base + j) * H * D, H * D, row);
            for (int r = 0; r < R; r++) {
                float p = s[r][j];
                const float *vr = row + (r / G) * D;
                float *a = acc[r];
#pragma omp simd
                for (int d = 0; d < D; d++) a[d] += p * vr[d];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float inv = 1.0f / l[r];
        for (int d = 0; d < D; d++) out[r * D + d] = acc[r][d] * inv;
        lse[r] = m[r] + logf(l[r]);
    }
}

/* Items [first, last) of the n * H (sequence, KV head) pairs. q/out [n, H, G, D] float32,
 * lse [n, H, G]; caches [num_blocks, bs, H, D] bf16 (bf16 != 0) or float32; tables int32
 * [n, table_stride]; lens int32 [n], each > 0. Returns 0, or -1 for sizes it was not built for. */
/* q/out [n, H, G, D] float32, lse [n, H, G]; caches [num_blocks, bs, H, D] bf16 (bf16 != 0)
 * or float32; tables int32 [n, table_stride]; lens int32 [n], each > 0. Each sequence's blocks
 * are split into up to `parts` ranges (flash-decoding: fewer sequences than threads), merged by
 * their lse. Returns 0, -1 for sizes it was not built for, -2 out of memory. */
int fapool_decode_attention(const float *q, const void *k_cache, const void *v_cache, int bf16,
                            const int32_t *tables, int table_stride, const int32_t *lens,
                            int n, int H, int G, int D, int bs, float *out, float *lse, int parts) {
    if (D > MAX_D || H * G > MAX_R || H * D > MAX_ROW || bs > MAX_BS) return -1;
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
    /* (sequence, part) items over the threads of the OpenMP runtime torch already loaded (same soname). */
#pragma omp parallel for schedule(dynamic, 1) if (n * parts > 1)
    for (int item = 0; item < n * parts; item++) {
        int seq = item / parts, p = item % parts;
        int nblocks = (lens[seq] + bs - 1) / bs;
        int np = parts < nblocks ? parts : nblocks;
        if (p >= np) continue;
        int b0 = (int)((int64_t)p * nblocks / np), b1 = (int)((int64_t)(p + 1) * nblocks / np);
        int64_t qo = (int64_t)seq * R, po = (int64_t)item * R;
        const int32_t *table = tables + (int64_t)seq * table_stride;
        float *o = part_out + po * D, *l = part_lse + po;
        /* Head sizes as constants: the compiler unrolls the row loops into whole vectors. */
        if (D == 64 && bf16)
            attend_seq(q + qo * D, k_cache, v_cache, 1, table, lens[seq], b0, b1, H, G, 64, bs, o, l);
        else if (D == 128 && bf16)
            attend_seq(q + qo * D, k_cache, v_cache, 1, table, lens[seq], b0, b1, H, G, 128, bs, o, l);
        else
            attend_seq(q + qo * D, k_cache, v_cache, bf16, table, lens[seq], b0, b1, H, G, D, bs, o, l);
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
}
