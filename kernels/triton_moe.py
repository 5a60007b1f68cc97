"""Fused mixture-of-experts in Triton (reference: reference.fused_moe).

The (token, expert) pairs of a batch are sorted by this rank's expert slot and each
expert's run padded to BLOCK_M (`align_pairs`, torch ops with no host sync, so a decode
graph can hold it); a grouped GEMM then runs every M-block against its expert's weights:
w13 on the gathered token rows, SiLU-and-mul, w2 with the top-k weights applied, and a sum
over each token's top-k. Pairs routed to experts this rank does not hold (expert
parallelism) sort into a last bucket whose blocks write zeros instead of computing.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from raylm.kernels.triton_layer_ops import silu_and_mul
from raylm.kernels.triton_support import dot_precision


def align_pairs(topk_ids: torch.Tensor, slot_of: torch.Tensor, num_local: int,
                block_m: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (sorted pair ids padded per expert with the sentinel T*K, [max_padded]; each
    M-block's local expert slot or -1 for another rank's experts; the padded total [1]).
    Sizes are static upper bounds: nothing here waits for the device."""
    pairs = topk_ids.numel()
    slots = slot_of[topk_ids.flatten()]  # num_local = "held by another rank"
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=slots.device)
    counts.scatter_add_(0, slots, torch.ones_like(slots))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    rank = torch.arange(pairs, device=slots.device) - (counts.cumsum(0) - counts)[sorted_slots]
    max_padded = triton.cdiv(pairs + (num_local + 1) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((max_padded,), pairs, dtype=torch.long, device=slots.device)
    sorted_pairs[(ends - padded)[sorted_slots] + rank] = order
    block_starts = torch.arange(0, max_padded, block_m, device=slots.device)
    block_slot = torch.bucketize(block_starts, ends, right=True)
    block_slot = torch.where(block_slot < num_local, block_slot, -1)
    return sorted_pairs, block_slot, ends[-1:]


_empty = torch.empty  # every scratch/output allocation (tests poison them through this)


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, c_ptr, pairs_ptr, block_slot_ptr, total_ptr, weights_ptr,
                         n, k, num_pairs, stride_a, stride_we, stride_wn, stride_wk, stride_c,
                         ROWS_PER_A: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    """c[pair, :] = a[pair // ROWS_PER_A] @ w[expert]^T (times the pair's top-k weight)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_ok = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = pair_ok[:, None] & (cols < n)[None, :]
    expert = tl.load(block_slot_ptr + pid_m)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if expert >= 0:
        rows = pairs // ROWS_PER_A
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :],
                        mask=pair_ok[:, None] & (ks < k)[None, :], other=0.0)
            w = tl.load(w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
                        * stride_wk, mask=(ks < k)[:, None] & (cols < n)[None, :], other=0.0)
            acc += tl.dot(a.to(w.dtype), w, input_precision=PRECISION)
        if MUL_WEIGHTS:
            acc *= tl.load(weights_ptr + pairs, mask=pair_ok, other=0.0)[:, None]
    tl.store(c_ptr + pairs[:, None] * stride_c + cols[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=out_ok)


def _grouped_gemm(a, w, c, sorted_pairs, block_slot, total, weights, rows_per_a, block_m):
    pairs, n, k = c.shape[0], w.shape[1], w.shape[2]
    block_n, block_k = 64, 32
    grid = (sorted_pairs.shape[0] // block_m, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](a, w, c, sorted_pairs, block_slot, total, weights, n, k, pairs,
                               a.stride(0), *w.stride(), c.stride(0), ROWS_PER_A=rows_per_a,
                               MUL_WEIGHTS=weights is not None, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(w.dtype))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, slot_of: torch.Tensor, block_m: int = 16) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up); w2 [E, H, I]; topk_weights, topk_ids
    [T, K] (global expert ids); slot_of [num_experts] -> this rank's slot, or E if another
    rank holds it. Returns the fp32 sum over each token's experts held here [T, H]."""
    tokens, top_k = topk_ids.shape
    sorted_pairs, block_slot, total = align_pairs(topk_ids, slot_of, w13.shape[0], block_m)
    up = _empty(tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, up, sorted_pairs, block_slot, total, None, top_k, block_m)
    act = silu_and_mul(up)
    down = _empty(tokens * top_k, w2.shape[1], dtype=torch.float32, device=x.device)
    weights = topk_weights.float().flatten().contiguous()
    _grouped_gemm(act, w2, down, sorted_pairs, block_slot, total, weights, 1, block_m)
    return down.view(tokens, top_k, w2.shape[1]).sum(1)
