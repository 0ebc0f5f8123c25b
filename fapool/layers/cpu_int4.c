/* Int4 weight-only matmul for a few rows on x86 CPUs with AVX512-BF16: y = x @ W^T with
 * W = scale * q + offset in groups of 32 input channels (q in 0..15, llama.cpp's Q4_1).
 * The nibbles become exact bf16 integers through a 32-entry table (vpermw), vdpbf16ps sums
 * x * q per group in float32, and each group's sum is scaled once: y += scale * sum(x * q)
 * + offset * sum(x). Rows go in chunks of 8 held in registers; output tiles of 16 columns are
 * spread over torch's OpenMP threads. Built by cpu_int4.py with -O3 -march=native -fopenmp. */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_KERNEL 1
#else
#define HAVE_KERNEL 0
#endif

#define TILE 16  /* output columns per tile: one vector of float32 */
#define GROUP 32 /* input channels per scale and offset */
#define MC 8     /* rows per register block */
#define MAX_M 64

int fapool_int4_supported(void) { return HAVE_KERNEL; }

#if HAVE_KERNEL
#include "../simd.h"

/* One tile of `mc` rows over all G groups. packed: [G][8][32] bytes of this tile, byte 2c + h of
 * pair p holding q[c][2p + h] (low nibble) and q[c][16 + 2p + h] (high); scale, offset: [G][16]. */
static inline __attribute__((always_inline)) void tile_rows(
    int mc, const uint8_t *packed, const float *scale, const float *offset, const uint32_t *x, int ldx_pairs,
    const float *xsum, int G, uint16_t *y, int ldy) {
    const __m512i table = _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                                           0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000,
                                           0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                                           0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);
    __m512 acc[MC];
#pragma GCC unroll 8
    for (int i = 0; i < MC; i++) acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512 t[MC];
#pragma GCC unroll 8
        for (int i = 0; i < MC; i++) t[i] = _mm512_setzero_ps();
        const uint8_t *src = packed + (int64_t)g * 256;
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++) {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + p * 32)));
            __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(w, table); /* index bits 0-4: table repeats */
            __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
#pragma GCC unroll 8
            for (int i = 0; i < MC; i++) {
                if (i < mc) {
                    const uint32_t *xr = x + (int64_t)i * ldx_pairs + g * 16;
                    t[i] = dot_bcast(t[i], lo, xr + p);
                    t[i] = dot_bcast(t[i], hi, xr + p + 8);
                }
            }
        }
        __m512 s = _mm512_loadu_ps(scale + g * TILE), o = _mm512_loadu_ps(offset + g * TILE);
#pragma GCC unroll 8
        for (int i = 0; i < MC; i++) {
            if (i < mc) {
                acc[i] = _mm512_fmadd_ps(t[i], s, acc[i]);
                acc[i] = _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[i * G + g]), acc[i]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MC; i++)
        if (i < mc) _mm256_storeu_si256((__m256i *)(y + (int64_t)i * ldy), (__m256i)_mm512_cvtneps_pbh(acc[i]));
}
#endif

/* x [M, K] bf16 (or float32 where x_f32, rounded to bf16 here), packed [N/16][K/32][8][32]
 * bytes, scale / offset [N/16][K/32][16] float32, y [M, N] bf16. Returns 0, or -1 where the
 * kernel is not built or the sizes are out of range, -2 out of memory. */
int fapool_int4_matmul(const void *x_in, int x_f32, int M, int K, const uint8_t *packed, const float *scale,
                       const float *offset, int N, uint16_t *y) {
#if HAVE_KERNEL
    if (M < 1 || M > MAX_M || K % GROUP || N % TILE) return -1;
    const int G = K / GROUP, tiles = N / TILE;
    if ((int64_t)M * G > MAX_M * 512) return -1;
    const uint16_t *x = (const uint16_t *)x_in;
    uint16_t *rounded = NULL;
    if (x_f32) { /* one pass to bf16 (round to nearest even, as torch's .to(bfloat16)) */
        rounded = malloc(sizeof(uint16_t) * (size_t)M * K);
        if (!rounded) return -2;
        const float *xf = (const float *)x_in;
        for (int64_t i = 0; i < (int64_t)M * K; i += 16)
            _mm256_storeu_si256((__m256i *)(rounded + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + i)));
        x = rounded;
    }
    /* Each row's sum over each group, for the offsets; bf16 widens to float32 by a shift. */
    float xsum[MAX_M * 512];
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + (int64_t)m * K + g * GROUP))), 16));
            __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + (int64_t)m * K + g * GROUP + 16))), 16));
            xsum[m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
    const uint32_t *x32 = (const uint32_t *)x;
#pragma omp parallel for schedule(static) if (tiles > 1)
    for (int j = 0; j < tiles; j++) {
        const uint8_t *pj = packed + (int64_t)j * G * 256;
        const float *sj = scale + (int64_t)j * G * TILE, *oj = offset + (int64_t)j * G * TILE;
        for (int m0 = 0; m0 < M; m0 += MC) {
            int mc = M - m0 < MC ? M - m0 : MC;
            const uint32_t *xr = x32 + (int64_t)m0 * (K / 2);
            uint16_t *yr = y + (int64_t)m0 * N + j * TILE;
            /* Row counts as constants: the register block unrolls fully for each. */
            switch (mc) {
            case 8: tile_rows(8, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 7: tile_rows(7, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 6: tile_rows(6, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 5: tile_rows(5, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 4: tile_rows(4, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 3: tile_rows(3, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            case 2: tile_rows(2, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            default: tile_rows(1, pj, sj, oj, xr, K / 2, xsum + m0 * G, G, yr, N); break;
            }
        }
    }
    free(rounded);
    return 0;
#else
    (void)x_in; (void)x_f32; (void)M; (void)K; (void)packed; (void)scale; (void)offset; (void)N; (void)y;
    return -1;
#endif
}
