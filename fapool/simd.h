/* AVX-512 helpers shared by the C kernels (fapool/native.py builds each .c that includes this;
 * a change here rebuilds them all). Include only where __AVX512F__, __AVX512BW__ and
 * __AVX512BF16__ are defined. */
#ifndef FAPOOL_SIMD_H
#define FAPOOL_SIMD_H
#include <immintrin.h>
#include <stdint.h>

/* The first n of 16 lanes (none for n <= 0). */
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* 16 bf16 (the lanes of m) widened to float32: a shift. */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* float32 -> bf16, round to nearest even (torch's .to(bfloat16)). */
static inline void store_bf16(uint16_t *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* v rounded to bf16 and widened back: the rounding of a torch op on bf16 tensors. */
static inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* exp(x), x clamped to [-87, 88]: 2^round(t) * 2^f with |f| <= 1/2, 2^f by its degree-7 Taylor
 * polynomial (relative error ~1e-8); exp(-inf) gives ~0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
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

/* acc += w . (the bf16 pair at x, broadcast), the broadcast folded into the instruction
 * ({1to16}): as a separate vpbroadcastd, which the compiler emits for _mm512_set1_epi32, it
 * takes a vector pipe from the dot products. */
static inline __attribute__((always_inline)) __m512 dot_bcast(__m512 acc, __m512bh w, const uint32_t *x) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
}
#endif
