/* A quantized Llama-family decoder's layers for one decode step in one call: per layer the
 * add + RMSNorm, the int4 qkv projection, rotary, the KV write, paged decode attention, o_proj,
 * add + RMSNorm and the gated SiLU MLP, then the final norm. The kernels are those of
 * cpu_int4.c, cpu_fused.c and cpu_decode.c, reached through function pointers the Python side
 * (cpu_stack.py) takes from their libraries; the order and every rounding are those of
 * LlamaModel.forward_steps with the same kernels, so the hidden states are the same bits
 * without the Python and tensor bookkeeping between the kernels. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_KERNEL 1
#include "../simd.h"
#else
#define HAVE_KERNEL 0
#endif

int fapool_stack_supported(void) { return HAVE_KERNEL; }

typedef int (*int4_matmul_fn)(const void *x, int x_f32, int M, int K, const uint8_t *packed, const float *scale,
                              const float *offset, int N, uint16_t *y);
typedef int (*add_rms_norm_fn)(const float *x, const void *delta, int delta_bf16, const float *weight, float *sum,
                               float *y, int T, int H, float eps);
typedef int (*rotary_fn)(const uint16_t *x, int64_t stride_t, int T, int H, int D, const float *cos, const float *sin,
                         int64_t stride_cs, uint16_t *out);
typedef int (*silu_mul_fn)(const uint16_t *gate_up, int64_t stride_t, int T, int F, uint16_t *out);
typedef int (*decode_fn)(const float *q, const void *k_cache, const void *v_cache, int bf16, const int32_t *tables,
                         int table_stride, const int32_t *lens, int n, int H, int G, int D, int bs, float *out,
                         float *lse, int parts);
typedef void (*write_kv_fn)(char *k_cache, char *v_cache, const char *key, int64_t key_stride, const char *value,
                            int64_t value_stride, const int64_t *slots, int n, int64_t row_bytes);

typedef struct {
    const uint8_t *data;
    const float *scale, *offset;
} Int4Weight;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights [hidden] float32 */
    Int4Weight qkv, o, gate_up, down;
} Layer;

typedef struct {
    int num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, scale; /* RMSNorm epsilon, softmax scale */
    const Layer *layers;
    const float *final_norm;
    int4_matmul_fn int4_matmul;
    add_rms_norm_fn add_rms_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    decode_fn decode;
    write_kv_fn write_kv;
} Model;

/* x [T, hidden] float32: the embedded tokens, one decode token per sequence (row t is sequence
 * t). cos / sin [T, head_dim / 2] (row stride cs_stride); k_caches / v_caches: each layer's
 * bf16 cache [blocks, block_size, kv_heads, head_dim]; slots [T]; tables [T, table_stride]
 * int32; lens [T] int32 (keys per sequence, this step's included); parts: decode's split of
 * each sequence's blocks. out [T, hidden] float32: the final-normed hidden states. Returns 0,
 * -2 out of memory, or the first failing kernel's code. */
int fapool_stack_decode(const Model *m, const float *x_in, int T, const float *cos, const float *sin,
                        int64_t cs_stride, void *const *k_caches, void *const *v_caches, const int64_t *slots,
                        const int32_t *tables, int table_stride, const int32_t *lens, int parts, float *out) {
#if HAVE_KERNEL
    const int H = m->hidden, D = m->head_dim, nq = m->num_heads, nk = m->num_kv_heads, F = m->intermediate;
    const int G = nq / nk, QD = nq * D, NQKV = (nq + 2 * nk) * D;
    const size_t f32 = (size_t)T * (2 * H + 2 * QD + nq), b16 = (size_t)T * (NQKV + (nq + nk) * D + QD + H + 3 * F);
    float *x = malloc(sizeof(float) * f32 + sizeof(uint16_t) * b16);
    if (!x) return -2;
    float *h = x + (size_t)T * H, *q32 = h + (size_t)T * H, *ao = q32 + (size_t)T * QD, *lse = ao + (size_t)T * QD;
    uint16_t *qkv = (uint16_t *)(lse + (size_t)T * nq), *qk = qkv + (size_t)T * NQKV, *a16 = qk + (size_t)T * (nq + nk) * D;
    uint16_t *delta = a16 + (size_t)T * QD, *gu = delta + (size_t)T * H, *act = gu + (size_t)T * 2 * F;
    memcpy(x, x_in, sizeof(float) * (size_t)T * H);
    int rc = 0;
    for (int l = 0; l < m->num_layers && rc == 0; l++) {
        const Layer *L = &m->layers[l];
        /* x (+ the last layer's MLP output) -> h = input_norm(x) */
        if ((rc = m->add_rms_norm(x, l ? delta : NULL, 1, L->input_norm, x, h, T, H, m->eps))) break;
        if ((rc = m->int4_matmul(h, 1, T, H, L->qkv.data, L->qkv.scale, L->qkv.offset, NQKV, qkv))) break;
        if ((rc = m->rotary(qkv, NQKV, T, nq + nk, D, cos, sin, cs_stride, qk))) break;
        m->write_kv(k_caches[l], v_caches[l], (const char *)(qk + QD), (int64_t)(nq + nk) * D * 2,
                    (const char *)(qkv + (nq + nk) * D), (int64_t)NQKV * 2, slots, T, (int64_t)nk * D * 2);
        const __m512 scale = _mm512_set1_ps(m->scale);
        for (int t = 0; t < T; t++) /* the queries in float32 times the scale, as the backend's q.float() * scale */
            for (int i = 0; i < QD; i += 16) {
                __mmask16 k = tail_mask(QD - i);
                _mm512_mask_storeu_ps(q32 + (size_t)t * QD + i, k, _mm512_mul_ps(load_bf16(qk + (size_t)t * (nq + nk) * D + i, k), scale));
            }
        if ((rc = m->decode(q32, k_caches[l], v_caches[l], 1, tables, table_stride, lens, T, nk, G, D, m->block_size,
                            ao, lse, parts)))
            break;
        for (int64_t i = 0; i < (int64_t)T * QD; i += 16) { /* .to(bfloat16) */
            __mmask16 k = tail_mask((int)((int64_t)T * QD - i < 16 ? (int64_t)T * QD - i : 16));
            store_bf16(a16 + i, _mm512_maskz_loadu_ps(k, ao + i), k);
        }
        if ((rc = m->int4_matmul(a16, 0, T, QD, L->o.data, L->o.scale, L->o.offset, H, delta))) break;
        if ((rc = m->add_rms_norm(x, delta, 1, L->post_norm, x, h, T, H, m->eps))) break;
        if ((rc = m->int4_matmul(h, 1, T, H, L->gate_up.data, L->gate_up.scale, L->gate_up.offset, 2 * F, gu))) break;
        if ((rc = m->silu_mul(gu, 2 * F, T, F, act))) break;
        if ((rc = m->int4_matmul(act, 0, T, F, L->down.data, L->down.scale, L->down.offset, H, delta))) break;
    }
    if (rc == 0) rc = m->add_rms_norm(x, delta, 1, m->final_norm, x, out, T, H, m->eps);
    free(x);
    return rc;
#else
    (void)m; (void)x_in; (void)T; (void)cos; (void)sin; (void)cs_stride; (void)k_caches; (void)v_caches; (void)slots;
    (void)tables; (void)table_stride; (void)lens; (void)parts; (void)out;
    return -1;
#endif
}
