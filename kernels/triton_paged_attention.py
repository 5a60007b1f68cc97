"""Paged attention for a mixed batch in Triton: one entry point for decode rows and prefill
chunks (causal over the cached prefix and the new tokens). Reference: reference.paged_attention.

Inputs follow vLLM's unified Triton attention: q [T, Hq, D]; the cache as two views
[num_blocks, block_size, Hkv, D]; `cu_seqlens_q` [S+1] (each sequence's query rows);
`seq_lens` [S] (context lengths, new tokens included, already stored); `block_table`
[S, max_blocks]. A program owns one tile of BLOCK_Q query tokens of one sequence times the
GQA group of one KV head (BLOCK_M = BLOCK_Q * group rows) and streams the sequence's keys
TILE_N positions at a time, looking each position's block up in the table (so any block
size works), with an online softmax in fp32. The split-KV path gives each program one of
NUM_SEGMENTS slices of the keys and writes partial sums that `_reduce_segments` combines:
decode batches too small to fill the GPU with one program per (sequence, KV head).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from raylm.kernels.triton_support import dot_precision


_empty = torch.empty  # every scratch/output allocation (tests poison them through this)


@triton.jit
def _find_sequence(cu_q_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The sequence whose tiles include program `pid`: sequence s's tiles start at
    cu_q[s] // BLOCK_Q + s (never fewer than it needs). Binary search, largest such s."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, part_max_ptr, part_sum_ptr,
        cu_q_ptr, seq_lens_ptr, table_ptr, num_seqs, num_q_heads, scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
        DECODE_ONLY: tl.constexpr, PRECISION: tl.constexpr):
    pid, kv_head, segment = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if DECODE_ONLY:  # one query token per sequence: program i is sequence i
        seq = pid
        q0 = 0
    else:
        seq = _find_sequence(cu_q_ptr, num_seqs, pid, BLOCK_Q)
        q0 = (pid - (tl.load(cu_q_ptr + seq) // BLOCK_Q + seq)) * BLOCK_Q
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    if q0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // GROUP_PAD  # query token within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (rows // GROUP_PAD < BLOCK_Q) & (tok < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    q_pos = ctx - q_len + tok  # absolute position: sees keys 0..q_pos
    kv_end = ctx - q_len + tl.minimum(q0 + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
    first = segment * per_segment
    last = tl.minimum(first + per_segment, num_tiles)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for t in range(first, last):
        pos = t * TILE_N + tl.arange(0, TILE_N)
        pos_ok = pos < kv_end
        block = tl.load(table_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        block = block.to(tl.int64)  # block * stride passes 2^31 in a large cache
        offset = pos % BLOCK_SIZE
        kv_ok = pos_ok[None, :] & dim_ok[:, None]
        k = tl.load(k_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + kv_head
                    * stride_kh + dims[:, None], mask=kv_ok, other=0.0)  # [HEAD_PAD, TILE_N]
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head
                    # [TILE_N, HEAD_PAD]
                    * stride_vh + dims[None, :], mask=tl.trans(kv_ok), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    token = q_begin + tok
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        idx = (token * num_q_heads + head) * NUM_SEGMENTS + segment
        tl.store(part_ptr + idx[:, None] * HEAD_PAD + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_max_ptr + idx, m, mask=row_ok)
        tl.store(part_sum_ptr + idx, l, mask=row_ok)


@triton.jit
def _reduce_segments(out_ptr, part_ptr, part_max_ptr, part_sum_ptr, num_q_heads, stride_ot,
                     stride_oh, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                     NUM_SEGMENTS: tl.constexpr):
    """out[token, head] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, over the segments."""
    token, head = tl.program_id(0), tl.program_id(1)
    base = (token * num_q_heads + head) * NUM_SEGMENTS
    segs = tl.arange(0, NUM_SEGMENTS)
    dims = tl.arange(0, HEAD_PAD)
    m = tl.load(part_max_ptr + base + segs)
    m_all = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))  # empty segments weigh nothing
    total = tl.sum(w * tl.load(part_sum_ptr + base + segs), 0)
    acc = tl.load(part_ptr + (base + segs)[:, None] * HEAD_PAD + dims[None, :])
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    out: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float, max_query_len: int,
                    num_segments: int = 1) -> torch.Tensor:
    """Writes attention of q [T, Hq, D] over the paged cache into `out` [T, Hq, D] and returns
    it. `max_query_len` (a host int) picks the tile shape; `num_segments` > 1 (a power of two)
    splits each sequence's keys. Rows of q past `cu_seqlens_q[-1]` get unspecified values."""
    num_seqs, (tokens, hq, d) = seq_lens.shape[0], q.shape
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    group_pad = triton.next_power_of_2(group)
    block_q = 1 if max_query_len == 1 else max(1, 64 // group_pad)
    block_m = max(16, block_q * group_pad)
    head_pad = max(16, triton.next_power_of_2(d))
    programs = num_seqs if max_query_len == 1 else tokens // block_q + num_seqs
    part = part_max = part_sum = out  # unused unless split
    if num_segments > 1:
        part = _empty(tokens, hq, num_segments, head_pad, dtype=torch.float32, device=q.device)
        part_max = _empty(tokens, hq, num_segments, dtype=torch.float32, device=q.device)
        part_sum = _empty(tokens, hq, num_segments, dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(programs, hkv, num_segments)](
        q, k_cache, v_cache, out, part, part_max, part_sum, cu_seqlens_q, seq_lens, block_table,
        num_seqs, hq, scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        HEAD_DIM=d, HEAD_PAD=head_pad, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        BLOCK_M=block_m, TILE_N=32 if block_size >= 32 else 16, BLOCK_SIZE=block_size,
        NUM_SEGMENTS=num_segments, DECODE_ONLY=max_query_len == 1,
        PRECISION=dot_precision(k_cache.dtype))
    if num_segments > 1:
        _reduce_segments[(tokens, hq)](out, part, part_max, part_sum, hq, out.stride(0),
                                       out.stride(1), HEAD_DIM=d, HEAD_PAD=head_pad,
                                       NUM_SEGMENTS=num_segments)
    return out
