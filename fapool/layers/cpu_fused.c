/* Fused CPU kernels (AVX-512) for the small ops around a quantized model's matmuls, each one
 * pass instead of a chain of aten ops (rms_norm alone is six): the residual add and RMSNorm,
 * rotary embedding, SiLU-and-multiply. Each rounds where the torch code it replaces rounds
 * (fapool.layers.norm.rms_norm, fapool.layers.rotary.apply_rotary, Activation then `*`).
 * Built by cpu_fused.py through fapool/native.py with -O3 -march=native -fopenmp. */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_KERNEL 1
#else
#define HAVE_KERNEL 0
#endif

#define PARALLEL_MIN 65536 /* elements: fewer stay on the calling thread */

int fapool_fused_supported(void) { return HAVE_KERNEL; }

#if HAVE_KERNEL
#include "../simd.h"
#endif

/* y [T, H] float32 = weight * (s * rsqrt(mean(s^2) + eps)), each product rounded to float32,
 * where s = x + delta (written to `sum`; delta [T, H] bf16 if delta_bf16 else float32) or, with
 * no delta, s = x. */
int fapool_add_rms_norm(const float *x, const void *delta, int delta_bf16, const float *weight, float *sum, float *y,
                        int T, int H, float eps) {
#if HAVE_KERNEL
#pragma omp parallel for schedule(static) if ((int64_t)T * H >= PARALLEL_MIN)
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * H;
        float *sr = delta ? sum + (int64_t)t * H : (float *)xr;
        __m512 sq = _mm512_setzero_ps();
        for (int c = 0; c < H; c += 16) {
            __mmask16 m = tail_mask(H - c);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + c);
            if (delta) {
                __m512 d = delta_bf16 ? load_bf16((const uint16_t *)delta + (int64_t)t * H + c, m)
                                      : _mm512_maskz_loadu_ps(m, (const float *)delta + (int64_t)t * H + c);
                v = _mm512_add_ps(v, d);
                _mm512_mask_storeu_ps(sr + c, m, v);
            }
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)H + eps));
        for (int c = 0; c < H; c += 16) {
            __mmask16 m = tail_mask(H - c);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr + c), r);
            _mm512_mask_storeu_ps(y + (int64_t)t * H + c, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, weight + c), v));
        }
    }
    return 0;
#else
    (void)x; (void)delta; (void)delta_bf16; (void)weight; (void)sum; (void)y; (void)T; (void)H; (void)eps;
    return -1;
#endif
}

/* x [T, H, D] bf16 (row stride stride_t, heads contiguous); cos, sin [T, D/2] float32 (row
 * stride stride_cs). out [T, H, D] bf16 contiguous = cat(x1 c - x2 s, x2 c + x1 s), c and s
 * rounded to bf16 and every product and sum rounded to bf16, as apply_rotary computes in bf16. */
int fapool_rotary_bf16(const uint16_t *x, int64_t stride_t, int T, int H, int D, const float *cos, const float *sin,
                       int64_t stride_cs, uint16_t *out) {
#if HAVE_KERNEL
    const int half = D / 2;
    if (D % 2 || half > 256) return -1;
#pragma omp parallel for schedule(static) if ((int64_t)T * H * D >= PARALLEL_MIN)
    for (int t = 0; t < T; t++) {
        __m512 cv[16], sv[16];
        for (int c = 0, i = 0; c < half; c += 16, i++) {
            __mmask16 m = tail_mask(half - c);
            cv[i] = round_bf16(_mm512_maskz_loadu_ps(m, cos + (int64_t)t * stride_cs + c));
            sv[i] = round_bf16(_mm512_maskz_loadu_ps(m, sin + (int64_t)t * stride_cs + c));
        }
        for (int h = 0; h < H; h++) {
            const uint16_t *xr = x + (int64_t)t * stride_t + (int64_t)h * D;
            uint16_t *o = out + ((int64_t)t * H + h) * D;
            for (int c = 0, i = 0; c < half; c += 16, i++) {
                __mmask16 m = tail_mask(half - c);
                __m512 x1 = load_bf16(xr + c, m), x2 = load_bf16(xr + half + c, m);
                __m512 a = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, cv[i])), round_bf16(_mm512_mul_ps(x2, sv[i])));
                __m512 b = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, cv[i])), round_bf16(_mm512_mul_ps(x1, sv[i])));
                store_bf16(o + c, a, m);
                store_bf16(o + half + c, b, m);
            }
        }
    }
    return 0;
#else
    (void)x; (void)stride_t; (void)T; (void)H; (void)D; (void)cos; (void)sin; (void)stride_cs; (void)out;
    return -1;
#endif
}

/* gate_up [T, 2F] bf16 (row stride stride_t) -> out [T, F] bf16 = bf16(silu(gate)) * up, each
 * rounded to bf16 as F.silu then `*` compute on bf16 tensors. */
int fapool_silu_mul_bf16(const uint16_t *gate_up, int64_t stride_t, int T, int F, uint16_t *out) {
#if HAVE_KERNEL
#pragma omp parallel for schedule(static) if ((int64_t)T * F >= PARALLEL_MIN)
    for (int t = 0; t < T; t++) {
        const uint16_t *g = gate_up + (int64_t)t * stride_t, *u = g + F;
        uint16_t *o = out + (int64_t)t * F;
        for (int c = 0; c < F; c += 16) {
            __mmask16 m = tail_mask(F - c);
            __m512 gv = load_bf16(g + c, m);
            __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
            store_bf16(o + c, _mm512_mul_ps(s, load_bf16(u + c, m)), m);
        }
    }
    return 0;
#else
    (void)gate_up; (void)stride_t; (void)T; (void)F; (void)out;
    return -1;
#endif
}
