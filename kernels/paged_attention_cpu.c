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

DEFINE_DECODE(paged_decode_bf16_generic, uint16_t, load_bf16)
DEFINE_DECODE(paged_decode_f32, float, load_f32)

/* The bf16 fast path (AVX-512, block size 16, head dim 64 or 128): per (sequence, kv head)
 * task, the query heads of the group go GN at a time with every accumulator in a register:
 * each K row and V row is loaded and widened once for GN heads (not once per head), and
 * the output sums stay in registers across the whole context (the generic loop keeps them
 * in memory). Same arithmetic as the generic kernel, summed in the same order. */
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 widen16(const uint16_t *p) { /* 16 bf16 -> 16 fp32 */
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* DD: head dim; GN query heads at once (GN x DD/16 output registers, at most 16) */
#define DEFINE_FAST(DD, GN)                                                                     \
    static void decode_group_d##DD(const float *q, const uint16_t *kc, const uint16_t *vc,      \
                                   const int64_t *table, int64_t L, int64_t gn, float *sc,      \
                                   float *out, float scale) {                                  \
        enum { NC = DD / 16 };                                                                  \
        float qs[GN][DD];                                                                       \
        for (int g = 0; g < GN; g++)                                                            \
            for (int d = 0; d < DD; d++) qs[g][d] = g < gn ? q[g * DD + d] * scale : 0.f;      \
        const int64_t nblocks = (L + 15) / 16;                                                  \
        for (int64_t b = 0; b < nblocks; b++) {                                                 \
            const uint16_t *k = kc + table[b] * 16 * DD;                                        \
            __m512 acc[GN];                                                                     \
            for (int g = 0; g < GN; g++) acc[g] = _mm512_setzero_ps();                          \
            for (int d = 0; d < DD; d++) {                                                      \
                const __m512 kv = widen16(k + d * 16);                                          \
                for (int g = 0; g < GN; g++)                                                    \
                    acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qs[g][d]), kv, acc[g]);             \
            }                                                                                   \
            for (int g = 0; g < GN; g++) _mm512_storeu_ps(sc + g * nblocks * 16 + b * 16, acc[g]); \
        }                                                                                       \
        for (int g = 0; g < gn; g++) {                                                          \
            float *s = sc + g * nblocks * 16, mx = s[0], sum = 0.f;                             \
            for (int64_t t = 1; t < L; t++) mx = s[t] > mx ? s[t] : mx;                         \
            _Pragma("omp simd reduction(+:sum)")                                               \
            for (int64_t t = 0; t < L; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }            \
            const float inv = 1.f / sum;                                                        \
            for (int64_t t = 0; t < L; t++) s[t] *= inv;                                        \
        }                                                                                       \
        __m512 o[GN][NC];                                                                       \
        for (int g = 0; g < GN; g++)                                                            \
            for (int c = 0; c < NC; c++) o[g][c] = _mm512_setzero_ps();                         \
        for (int64_t b = 0; b < nblocks; b++) {                                                 \
            const uint16_t *v = vc + table[b] * 16 * DD;                                        \
            const int64_t tn = (b + 1) * 16 <= L ? 16 : L - b * 16;                             \
            for (int64_t t = 0; t < tn; t++) {                                                  \
                __m512 vr[NC];                                                                  \
                for (int c = 0; c < NC; c++) vr[c] = widen16(v + t * DD + c * 16);             \
                for (int g = 0; g < GN; g++) {                                                  \
                    const __m512 w = _mm512_set1_ps(g < gn ? sc[g * nblocks * 16 + b * 16 + t] : 0.f); \
                    for (int c = 0; c < NC; c++) o[g][c] = _mm512_fmadd_ps(w, vr[c], o[g][c]);  \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int g = 0; g < gn; g++)                                                            \
            for (int c = 0; c < NC; c++) _mm512_storeu_ps(out + g * DD + c * 16, o[g][c]);      \
    }

DEFINE_FAST(64, 4)
DEFINE_FAST(128, 2)
#define HAVE_FAST 1
#endif

void paged_decode_bf16(const float *q, const uint16_t *cache, const int64_t *tables,
                       const int64_t *lens, float *out, int64_t S, int64_t Hq, int64_t Hkv,
                       int64_t D, int64_t NB, int64_t BS, int64_t max_nb, float scale) {
#if defined(HAVE_FAST)
    if (BS == 16 && (D == 64 || D == 128)) {
        const int64_t G = Hq / Hkv, GN = D == 64 ? 4 : 2, plane = Hkv * NB * BS * D;
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")
        for (int64_t s = 0; s < S; s++) {
            for (int64_t h = 0; h < Hkv; h++) {
                const int64_t L = lens[s], nblocks = (L + 15) / 16;
                float *sc = malloc(sizeof(float) * GN * nblocks * 16);
                const uint16_t *kc = cache + h * NB * BS * D, *vc = kc + plane;
                const int64_t *table = tables + s * max_nb;
                for (int64_t g0 = 0; g0 < G; g0 += GN) {
                    const int64_t gn = G - g0 < GN ? G - g0 : GN, row = s * Hq + h * G + g0;
                    if (D == 64)
                        decode_group_d64(q + row * D, kc, vc, table, L, gn, sc, out + row * D, scale);
                    else
                        decode_group_d128(q + row * D, kc, vc, table, L, gn, sc, out + row * D, scale);
                }
                free(sc);
            }
        }
        return;
    }
#endif
    paged_decode_bf16_generic(q, cache, tables, lens, out, S, Hq, Hkv, D, NB, BS, max_nb, scale);
}
