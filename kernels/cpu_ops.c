/* The decoder's element-wise ops for CPU, fused: residual-add + RMSNorm, rotary in place on
 * q and k, SiLU-and-mul, and the cpu attention backend's KV store. Each is one call where
 * torch runs 4-12 small ops (10-50 us of dispatch apiece at decode sizes). Built at first
 * use by raylm.kernels.cpu_ops (the same build and fallback as the attention kernel) and
 * called through ctypes; the references are raylm.kernels.reference.
 *
 * Every kernel computes in fp32 and rounds once on store; T is float or bf16 (uint16, round
 * to nearest even). Rows are strided (`*_stride` in elements); the last dim is contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#define LD_f32(p, i) ((p)[i])
#define ST_f32(p, i, v) ((p)[i] = (v))
#define LD_bf16(p, i) from_bf16((p)[i])
#define ST_bf16(p, i, v) ((p)[i] = to_bf16(v))
/* a value rounded to the storage type and back: what a torch op in that dtype would hold */
#define RT_f32(v) (v)
#define RT_bf16(v) from_bf16(to_bf16(v))

#define DEFINE_OPS(S, T)                                                                        \
    /* out = rmsnorm(x [+ residual]) * w; with residual, res_out = x + residual (rounded) */    \
    static void add_rms_norm_scalar_##S(const T *x, const T *res, const T *w, T *out, T *res_out, \
                          int64_t rows, int64_t n, int64_t x_stride, int64_t r_stride,          \
                          float eps) {                                                          \
        _Pragma("omp parallel for if (rows >= 32)")                                             \
        for (int64_t r = 0; r < rows; r++) {                                                    \
            const T *xr = x + r * x_stride;                                                     \
            T *o = out + r * n;                                                                 \
            float ss = 0.f;                                                                     \
            if (res) {                                                                          \
                const T *rr = res + r * r_stride;                                               \
                T *ro = res_out + r * n;                                                        \
                for (int64_t i = 0; i < n; i++) {                                               \
                    float s = RT_##S(LD_##S(xr, i) + LD_##S(rr, i));                            \
                    ST_##S(ro, i, s);                                                           \
                    ss += s * s;                                                                \
                }                                                                               \
                xr = ro;                                                                        \
            } else {                                                                            \
                for (int64_t i = 0; i < n; i++) ss += LD_##S(xr, i) * LD_##S(xr, i);            \
            }                                                                                   \
            const float inv = 1.f / sqrtf(ss / (float)n + eps);                                 \
            for (int64_t i = 0; i < n; i++) ST_##S(o, i, LD_##S(xr, i) * inv * LD_##S(w, i));   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    /* rotate heads [T, H, D] in place: pairs (i, i + D/2) (neox) or (2i, 2i + 1) */           \
    static void rotate_##S(T *x, const int64_t *pos, const float *cos, const float *sin,        \
                           int64_t tokens, int64_t heads, int64_t t_stride, int64_t h_stride,   \
                           int64_t half, int neox) {                                            \
        for (int64_t t = 0; t < tokens; t++) {                                                  \
            const float *c = cos + pos[t] * half, *s = sin + pos[t] * half;                     \
            for (int64_t h = 0; h < heads; h++) {                                               \
                T *row = x + t * t_stride + h * h_stride;                                       \
                for (int64_t i = 0; i < half; i++) {                                            \
                    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;        \
                    const float x1 = LD_##S(row, a), x2 = LD_##S(row, b);                       \
                    ST_##S(row, a, x1 * c[i] - x2 * s[i]);                                      \
                    ST_##S(row, b, x2 * c[i] + x1 * s[i]);                                      \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    void rotary_##S(T *q, T *k, const int64_t *pos, const float *cos, const float *sin,         \
                    int64_t tokens, int64_t hq, int64_t hkv, int64_t q_stride, int64_t k_stride, \
                    int64_t head_dim, int neox) {                                               \
        rotate_##S(q, pos, cos, sin, tokens, hq, q_stride, head_dim, head_dim / 2, neox);       \
        rotate_##S(k, pos, cos, sin, tokens, hkv, k_stride, head_dim, head_dim / 2, neox);      \
    }                                                                                           \
                                                                                                \
    /* out [rows, n] = silu(x[:, :n]) * x[:, n:] */                                            \
    void silu_and_mul_##S(const T *x, T *out, int64_t rows, int64_t n, int64_t x_stride) {      \
        _Pragma("omp parallel for if (rows >= 32)")                                             \
        for (int64_t r = 0; r < rows; r++) {                                                    \
            const T *g = x + r * x_stride, *u = g + n;                                          \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const float a = LD_##S(g, i);                                                   \
                ST_##S(out + r * n, i, a / (1.f + expf(-a)) * LD_##S(u, i));                    \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    /* The cpu backend's cache [2, Hkv, NB, BS, D] with K transposed within a block ([D][BS]): \
     * token t's k, v [Hkv, D] (rows k_stride apart) go to slot = block * BS + offset. */      \
    void store_kv_##S(const T *k, const T *v, T *cache, const int64_t *slots, int64_t tokens,   \
                      int64_t hkv, int64_t d, int64_t nb, int64_t bs, int64_t k_stride,         \
                      int64_t v_stride) {                                                       \
        const int64_t plane = hkv * nb * bs * d, head = nb * bs * d;                            \
        for (int64_t t = 0; t < tokens; t++) {                                                  \
            const int64_t blk = slots[t] / bs, off = slots[t] % bs;                             \
            for (int64_t h = 0; h < hkv; h++) {                                                 \
                T *kb = cache + h * head + blk * bs * d, *vb = cache + plane + h * head + blk * bs * d; \
                for (int64_t i = 0; i < d; i++) {                                               \
                    kb[i * bs + off] = k[t * k_stride + h * d + i];                             \
                    vb[off * d + i] = v[t * v_stride + h * d + i];                              \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_OPS(f32, float)
DEFINE_OPS(bf16, uint16_t)

void add_rms_norm_f32(const float *x, const float *res, const float *w, float *out, float *res_out,
                      int64_t rows, int64_t n, int64_t x_stride, int64_t r_stride, float eps) {
    add_rms_norm_scalar_f32(x, res, w, out, res_out, rows, n, x_stride, r_stride, eps);
}

/* bf16 add + RMSNorm with AVX-512 when rows are whole vectors: the scalar loop's rounding
 * (to_bf16: round to nearest even, NaN kept quiet) vectorized, so x + residual is the same
 * bit for bit; the sum of squares runs in 16 lanes (another order: the norm may differ in
 * the last bit). The scalar loop did not vectorize (~1.2 ns an element at decode sizes). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 load_bf16x16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m256i round_bf16x16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

static void add_rms_norm_row_avx512(const uint16_t *x, const uint16_t *res, const uint16_t *w,
                                    uint16_t *o, uint16_t *ro, int64_t n, float eps) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 s = load_bf16x16(x + i);
        if (res) {
            const __m256i r = round_bf16x16(_mm512_add_ps(s, load_bf16x16(res + i)));
            _mm256_storeu_si256((__m256i *)(ro + i), r);
            s = load_bf16x16(ro + i);
        }
        ss = _mm512_fmadd_ps(s, s, ss);
    }
    const float inv = 1.f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps);
    const uint16_t *src = res ? ro : x;
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load_bf16x16(src + i), _mm512_set1_ps(inv)),
                                       load_bf16x16(w + i));
        _mm256_storeu_si256((__m256i *)(o + i), round_bf16x16(v));
    }
}
#endif

void add_rms_norm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out,
                       uint16_t *res_out, int64_t rows, int64_t n, int64_t x_stride,
                       int64_t r_stride, float eps) {
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        _Pragma("omp parallel for if (rows >= 32)")
        for (int64_t r = 0; r < rows; r++)
            add_rms_norm_row_avx512(x + r * x_stride, res ? res + r * r_stride : NULL, w,
                                    out + r * n, res ? res_out + r * n : NULL, n, eps);
        return;
    }
#endif
    add_rms_norm_scalar_bf16(x, res, w, out, res_out, rows, n, x_stride, r_stride, eps);
}

/* Decode-sized bf16 GEMM: y [M, N] = x [M, K] w [N, K]^T (+ bias), for M of a few rows, where
 * oneDNN's per-call cost (~20 us) dominates and the work is streaming w once. Each output
 * column reads its weight row once for all M rows, 32 bf16 products per AVX-512 BF16
 * instruction (vdpbf16ps), fp32 sums, one rounding. Without AVX512-BF16 the scalar loop
 * below is correct but slow: gemv_bf16_fast() says which was built, and callers use this
 * only when it is fast. */
#if defined(__AVX512BF16__)
#include <immintrin.h>
int gemv_bf16_fast(void) { return 1; }
#else
int gemv_bf16_fast(void) { return 0; }
#endif

static void gemv_rows(const uint16_t *x, const uint16_t *wr, float *s, int64_t M, int64_t K) {
    int64_t k = 0;
#if defined(__AVX512BF16__)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 32 <= K; k += 32) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wr + k);
        for (int64_t m = 0; m < M; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), w);
    }
    for (int64_t m = 0; m < M; m++) s[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int64_t m = 0; m < M; m++) s[m] = 0.f;
#endif
    for (; k < K; k++)
        for (int64_t m = 0; m < M; m++) s[m] += from_bf16(x[m * K + k]) * from_bf16(wr[k]);
}

void gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
               int64_t N, int64_t K) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {  /* four rows at a time share each weight row */
        const int64_t rows = M - m0 < 4 ? M - m0 : 4;
        _Pragma("omp parallel for schedule(static)")
        for (int64_t n = 0; n < N; n++) {
            float s[4];
            gemv_rows(x + m0 * K, w + n * K, s, rows, K);
            const float b = bias ? from_bf16(bias[n]) : 0.f;
            for (int64_t m = 0; m < rows; m++) y[(m0 + m) * N + n] = to_bf16(s[m] + b);
        }
    }
}

/* One token per row of logits [rows, vocab] (row stride `stride`): argmax where temps[r] is
 * 0, else a draw from softmax(logits / T) by inverse CDF with the row's uniform u[r] in
 * [0, 1): the first token whose running sum of exp(l / T - max) exceeds u * total, as
 * the torch sampler's cumsum + searchsorted does: a max pass, a pass summing exp per
 * 16-token chunk, a scan of the chunk sums, and the crossing chunk's weights computed
 * again (the same values). A zero-weight token is never picked. */
#define SAMPLE_CHUNK 16
#define DEFINE_SAMPLE(S, T)                                                                     \
    static inline float chunk_weights_##S(const T *l, int64_t i0, int64_t vocab, float t,       \
                                          float mx, float *w) {                                 \
        float x[SAMPLE_CHUNK], sum = 0.f;                                                       \
        if (i0 + SAMPLE_CHUNK <= vocab) {                                                       \
            _Pragma("omp simd")                                                                 \
            for (int j = 0; j < SAMPLE_CHUNK; j++) x[j] = LD_##S(l, i0 + j) / t - mx;           \
        } else {                                                                                \
            for (int j = 0; j < SAMPLE_CHUNK; j++) /* past the end: -1e30 has weight 0 */      \
                x[j] = i0 + j < vocab ? LD_##S(l, i0 + j) / t - mx : -1e30f;                    \
        }                                                                                       \
        _Pragma("omp simd")                                                                     \
        for (int j = 0; j < SAMPLE_CHUNK; j++) w[j] = expf(x[j]);                               \
        for (int j = 0; j < SAMPLE_CHUNK; j++) sum += w[j];                                     \
        return sum;                                                                             \
    }                                                                                           \
                                                                                                \
    static int64_t first_max_##S(const T *l, int64_t vocab, float t, float mx) {              \
        for (int64_t i = 0; i < vocab; i++)                                                     \
            if (LD_##S(l, i) / t == mx) return i;                                               \
        return 0;                                                                               \
    }                                                                                           \
                                                                                                \
    static int64_t sample_row_##S(const T *l, int64_t vocab, float t, float u) {                \
        const float tt = t > 0.f ? t : 1.f;                                                     \
        float mx = LD_##S(l, 0) / tt;                                                           \
        _Pragma("omp simd reduction(max:mx)") /* the index only when needed: vectorizes */     \
        for (int64_t i = 1; i < vocab; i++) mx = fmaxf(mx, LD_##S(l, i) / tt);                  \
        if (t <= 0.f) return first_max_##S(l, vocab, tt, mx);                                  \
        const int64_t chunks = (vocab + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK;                       \
        float w[SAMPLE_CHUNK], total = 0.f, run = 0.f, *sums = malloc(sizeof(float) * chunks);  \
        for (int64_t c = 0; c < chunks; c++)                                                    \
            total += sums[c] = chunk_weights_##S(l, c * SAMPLE_CHUNK, vocab, t, mx, w);         \
        const float target = u * total;                                                         \
        int64_t pick = -1;                                                                      \
        for (int64_t c = 0; c < chunks && pick < 0; c++) {                                      \
            if (run + sums[c] <= target) { run += sums[c]; continue; }                          \
            chunk_weights_##S(l, c * SAMPLE_CHUNK, vocab, t, mx, w); /* same values again */    \
            for (int j = 0; j < SAMPLE_CHUNK && c * SAMPLE_CHUNK + j < vocab; j++) {            \
                run += w[j];                                                                    \
                if (run > target && w[j] > 0.f) { pick = c * SAMPLE_CHUNK + j; break; }         \
            }                                                                                   \
        }                                                                                       \
        free(sums);                                                                             \
        /* rounding left the target past the last sum: the max token (weight 1) is safe */      \
        return pick >= 0 ? pick : first_max_##S(l, vocab, tt, mx);                              \
    }                                                                                           \
                                                                                                \
    void sample_rows_##S(const T *logits, int64_t rows, int64_t vocab, int64_t stride,          \
                         const float *temps, const float *u, int64_t *out) {                    \
        _Pragma("omp parallel for schedule(static) if (rows > 1)")                              \
        for (int64_t r = 0; r < rows; r++)                                                      \
            out[r] = sample_row_##S(logits + r * stride, vocab, temps[r], u[r]);                \
    }

DEFINE_SAMPLE(f32, float)
DEFINE_SAMPLE(bf16, uint16_t)

/* Structured outputs: logits[rows[i], t] = -inf wherever bit t (bit t % 32 of word t / 32)
   of bitmask row i is clear. Whole words of allowed tokens are skipped. */
#define DEFINE_MASK(S, T, NEG)                                                                  \
    void mask_rows_##S(T *logits, int64_t stride, int64_t vocab, const int32_t *bitmask,        \
                       int64_t words, const int64_t *rows, int64_t n) {                         \
        for (int64_t i = 0; i < n; i++) {                                                       \
            T *l = logits + rows[i] * stride;                                                   \
            const uint32_t *bits = (const uint32_t *)(bitmask + i * words);                     \
            for (int64_t w = 0; w < words && w * 32 < vocab; w++) {                             \
                uint32_t m = bits[w];                                                           \
                if (m == 0xffffffffu) continue;                                                 \
                int64_t base = w * 32, end = base + 32 < vocab ? base + 32 : vocab;             \
                for (int64_t t = base; t < end; t++)                                            \
                    if (!((m >> (t - base)) & 1u)) l[t] = NEG;                                  \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_MASK(f32, float, -INFINITY)
DEFINE_MASK(bf16, uint16_t, 0xFF80) /* bf16 -inf */
