/* A dense Llama-family decoder stack for CPU decode steps of a few rows, in one call.
 *
 * Why: at one row a layer's ten ops (two norms, three GEMVs, rotary, KV store, attention,
 * SiLU-and-mul, one more GEMV) each cost 10-40 us of Python, torch and ctypes dispatch, ~4
 * ms a step for SmolLM2's 30 layers against ~8 ms of streaming its weights. This runs the
 * same C kernels (cpu_ops.c, paged_attention_cpu.c, included below) in the same order with
 * the same roundings, so its outputs equal the per-op path bit for bit (the tests say so).
 * Built and loaded by raylm.kernels.cpu_decode_stack; callers use it only for bf16, tensor
 * parallel size 1, pure decode batches of at most GEMV_MAX_ROWS rows.
 */
#include <stdlib.h>

#include "cpu_ops.c"
#include "paged_attention_cpu.c"

/* One layer's weights (bf16 as uint16) and its KV cache [2, Hkv, NB, BS, D]. */
typedef struct {
    const uint16_t *ln1, *ln2, *w_qkv, *b_qkv, *w_o, *w_gate_up, *w_down;
    uint16_t *cache;
} DecodeLayer;

/* Shapes and constants shared by every layer of the stack. */
typedef struct {
    int64_t hidden, hq, hkv, head_dim, inter, num_blocks, block_size;
    float eps, scale;
    const float *cos, *sin; /* [max_position, head_dim / 2] */
    int64_t neox;
} DecodeDims;

/* Rotary on q and k in place, this step's K/V into the cache, paged attention over it,
 * rounded to bf16: qkv [M, (hq + 2 hkv) D] -> attn16 [M, hq D]. qf, attn: fp32 scratch. */
static void attention_core(const DecodeLayer *l, const DecodeDims *d, uint16_t *qkv, float *qf,
                           float *attn, uint16_t *attn16, const int64_t *pos,
                           const int64_t *slots, const int64_t *tables, const int64_t *lens,
                           int64_t M, int64_t max_nb) {
    const int64_t D = d->head_dim, qn = d->hq * D, kvn = d->hkv * D, w = qn + 2 * kvn;
    rotary_bf16(qkv, qkv + qn, pos, d->cos, d->sin, M, d->hq, d->hkv, w, w, D, (int)d->neox);
    store_kv_bf16(qkv + qn, qkv + qn + kvn, l->cache, slots, M, d->hkv, D, d->num_blocks,
                  d->block_size, w, w);
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < qn; i++) qf[m * qn + i] = from_bf16(qkv[m * w + i]);
    paged_decode_bf16(qf, l->cache, tables, lens, attn, M, d->hq, d->hkv, D, d->num_blocks,
                      d->block_size, max_nb, d->scale);
    for (int64_t i = 0; i < M * qn; i++) attn16[i] = to_bf16(attn[i]);
}

/* The attention half of one layer for bigger batches, whose GEMMs oneDNN runs (Python):
 * qkv (modified: rotated in place) -> out [M, hq D] bf16. */
void decode_attention_bf16(const DecodeLayer *l, const DecodeDims *d, uint16_t *qkv,
                           uint16_t *out, const int64_t *pos, const int64_t *slots,
                           const int64_t *tables, const int64_t *lens, int64_t M,
                           int64_t max_nb) {
    const int64_t qn = d->hq * d->head_dim;
    float *fbuf = malloc(sizeof(float) * M * 2 * qn);
    attention_core(l, d, qkv, fbuf, fbuf + M * qn, out, pos, slots, tables, lens, M, max_nb);
    free(fbuf);
}

static void attention_block(const DecodeLayer *l, const DecodeDims *d, const uint16_t *normed,
                            uint16_t *qkv, float *qf, float *attn, uint16_t *attn16, uint16_t *o,
                            const int64_t *pos, const int64_t *slots, const int64_t *tables,
                            const int64_t *lens, int64_t M, int64_t max_nb) {
    const int64_t qn = d->hq * d->head_dim, w = qn + 2 * d->hkv * d->head_dim;
    gemv_bf16(normed, l->w_qkv, l->b_qkv, qkv, M, w, d->hidden);
    attention_core(l, d, qkv, qf, attn, attn16, pos, slots, tables, lens, M, max_nb);
    gemv_bf16(attn16, l->w_o, NULL, o, M, d->hidden, qn);
}

/* x [M, hidden] (and residual, or NULL before the first layer) -> out, res_out: what the
 * layers' per-op forward returns as (x, residual). Layer i reads block table row-major
 * tables [M, max_nb] and context lengths lens [M] (this step's token included). */
void decode_stack_bf16(const DecodeLayer *layers, int64_t num_layers, const DecodeDims *d,
                       const uint16_t *x, const uint16_t *residual, uint16_t *out,
                       uint16_t *res_out, const int64_t *pos, const int64_t *slots,
                       const int64_t *tables, const int64_t *lens, int64_t M, int64_t max_nb) {
    const int64_t H = d->hidden, qn = d->hq * d->head_dim, I = d->inter;
    const int64_t w = qn + 2 * d->hkv * d->head_dim;
    uint16_t *buf = malloc(sizeof(uint16_t) * M * (4 * H + w + qn + 3 * I));
    float *fbuf = malloc(sizeof(float) * M * 2 * qn);
    uint16_t *normed = buf, *o = normed + M * H, *res = o + M * H, *h = res + M * H;
    uint16_t *qkv = h + M * H, *attn16 = qkv + M * w, *gu = attn16 + M * qn, *act = gu + 2 * M * I;
    memcpy(h, x, sizeof(uint16_t) * M * H);
    if (residual) memcpy(res, residual, sizeof(uint16_t) * M * H);
    for (int64_t i = 0; i < num_layers; i++) {
        const DecodeLayer *l = layers + i;
        const int first = i == 0 && residual == NULL;
        if (first) memcpy(res, h, sizeof(uint16_t) * M * H);
        add_rms_norm_bf16(h, first ? NULL : res, l->ln1, normed, first ? NULL : res, M, H, H, H,
                          d->eps);
        attention_block(l, d, normed, qkv, fbuf, fbuf + M * qn, attn16, o, pos, slots, tables,
                        lens, M, max_nb);
        add_rms_norm_bf16(o, res, l->ln2, normed, res, M, H, H, H, d->eps);
        gemv_bf16(normed, l->w_gate_up, NULL, gu, M, 2 * I, H);
        silu_and_mul_bf16(gu, act, M, I, 2 * I);
        gemv_bf16(act, l->w_down, NULL, h, M, H, I);
    }
    memcpy(out, h, sizeof(uint16_t) * M * H);
    memcpy(res_out, res, sizeof(uint16_t) * M * H);
    free(buf);
    free(fbuf);
}
