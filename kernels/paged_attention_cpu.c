/* Paged decode attention for CPU: one query token per sequence, K/V read in place from the
 * block-paged cache (no gather copy). Built at first use by raylm.kernels.cpu_paged_attention
 * with gcc -O3 -march=native -fopenmp and called through ctypes; the torch path in
 * raylm/models/attention.py is its reference.
 *
 * Layouts (row-major):
 *   q      [S, Hq, D]            fp32
 *   cache  [2, Hkv, NB, BS*D]    bf16 (as uint16) or fp32. Within a block K is stored
 *                                transposed, [D][BS], and V as [BS][D]: both inner loops
 *                                then run over contiguous memory (no transposes here)
 *   tables [S, max_nb]           int64 block ids
 *   lens   [S]                   int64 context lengths (the new token included)
 *   out    [S, Hq, D]            fp32
 * Query head h reads kv head h / G, G = Hq / Hkv (HF's grouped-query layout).
 * Softmax is exact (max-subtracted, fp32); one task per (sequence, kv head) so each K/V row
 * is read once for all G query heads of its group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline float load_f32(const float *p, int64_t i) { return p[i]; }

/* One task = (sequence, kv head). Pass 1, per block: scores[g][t] += q[g][d] * K[d][t],
 * vectorized over the block's tokens t. Pass 2: exact softmax per query head. Pass 3, per
 * block: out[g][:] += p[g][t] * V[t][:], vectorized over D. */
#define DEFINE_DECODE(NAME, T, LOAD)                                                            \
    void NAME(const float *q, const T *cache, const int64_t *tables, const int64_t *lens,      \
              float *out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t NB,           \
              int64_t BS, int64_t max_nb, float scale) {                                        \
        const int64_t G = Hq / Hkv;                                                             \
        const T *vcache = cache + Hkv * NB * BS * D;                                            \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                           \
        for (int64_t s = 0; s < S; s++) {                                                       \
            for (int64_t h = 0; h < Hkv; h++) {                                                 \
                const int64_t L = lens[s], nblocks = (L + BS - 1) / BS;                         \
                const float *qs = q + (s * Hq + h * G) * D;                                     \
                float *os = out + (s * Hq + h * G) * D;                                         \
                float *scores = (float *)malloc(sizeof(float) * G * nblocks * BS);              \
                for (int64_t b = 0; b < nblocks; b++) {                                         \
                    const T *k = cache + (h * NB + tables[s * max_nb + b]) * BS * D;            \
                    for (int64_t g = 0; g < G; g++) {                                           \
                        float *sc = scores + g * nblocks * BS + b * BS;                         \
                        if (BS == 16) { /* the default: 16 partial scores stay in a register */ \
                            float acc[16] = {0};                                                \
                            for (int64_t d = 0; d < D; d++) {                                   \
                                const float qd = qs[g * D + d] * scale;                         \
                                _Pragma("omp simd")                                             \
                                for (int t = 0; t < 16; t++) acc[t] += qd * LOAD(k, d * 16 + t); \
                            }                                                                   \
                            memcpy(sc, acc, sizeof acc);                                        \
                            continue;                                                           \
                        }                                                                       \
                        for (int64_t t = 0; t < BS; t++) sc[t] = 0.f;                           \
                        for (int64_t d = 0; d < D; d++) {                                       \
                            const float qd = qs[g * D + d] * scale;                             \
                            _Pragma("omp simd")                                                 \
                            for (int64_t t = 0; t < BS; t++) sc[t] += qd * LOAD(k, d * BS + t);  \
                        }                                                                       \
                    }                                                                           \
                }                                                                               \
                for (int64_t g = 0; g < G; g++) {                                               \
                    float *sc = scores + g * nblocks * BS;                                      \
                    float mx = sc[0], sum = 0.f;                                                \
                    for (int64_t t = 1; t < L; t++) mx = sc[t] > mx ? sc[t] : mx;               \
                    _Pragma("omp simd reduction(+:sum)")                                       \
                    for (int64_t t = 0; t < L; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; } \
                    const float inv = 1.f / sum;                                                \
                    for (int64_t t = 0; t < L; t++) sc[t] *= inv;                               \
                    for (int64_t d = 0; d < D; d++) os[g * D + d] = 0.f;                        \
                }                                                                               \
                for (int64_t b = 0; b < nblocks; b++) {                                         \
                    const T *v = vcache + (h * NB + tables[s * max_nb + b]) * BS * D;           \
                    const int64_t tn = (b + 1) * BS <= L ? BS : L - b * BS;                     \
                    for (int64_t t = 0; t < tn; t++) {                                          \
                        for (int64_t g = 0; g < G; g++) {                                       \
                            const float w = scores[g * nblocks * BS + b * BS + t];              \
                            _Pragma("omp simd")                                                 \
                            for (int64_t d = 0; d < D; d++) os[g * D + d] += w * LOAD(v, t * D + d); \
                        }                                                                       \
                    }                                                                           \
                }                                                                               \
                free(scores);                                                                   \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_DECODE(paged_decode_bf16, uint16_t, load_bf16)
DEFINE_DECODE(paged_decode_f32, float, load_f32)
