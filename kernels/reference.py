"""Torch references for the Triton kernels (raylm.kernels.triton_*), one function per
kernel with the same name and arguments (less the preallocated outputs). They import no
Triton: the op dispatcher (raylm.kernels.ops) runs them wherever Triton does not, and the
tests compare every kernel against them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    if residual is not None:
        x = residual = x + residual
    out = F.rms_norm(x, weight.shape, weight, eps)
    return out if residual is None else (out, residual)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, neox: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary: cos/sin cast to the activation dtype and applied in it; new tensors."""
    cos = cos[positions].unsqueeze(1).to(q.dtype)
    sin = sin[positions].unsqueeze(1).to(q.dtype)
    x = torch.cat((q, k), dim=1)
    if neox:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]  # slices: two fewer dispatched ops than chunk
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.split([q.shape[1], k.shape[1]], dim=1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, scale: float,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: per sequence, gather its keys from the table and run fp32 causal
    softmax attention written out in torch (GQA by repeating KV heads)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    hq, hkv = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    bounds, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for s, ctx in enumerate(lens):
        lo, hi = bounds[s], bounds[s + 1]
        pos = torch.arange(ctx, device=q.device)
        blocks = block_table[s].long()[pos // block_size]
        # [ctx, Hq, D]
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(hq // hkv, 1)
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(hq // hkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    keep = slots >= 0
    slots, block_size = slots[keep], k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """fp32 sum over this rank's experts of weight * expert(x), per token. The (token,
    expert) pairs are sorted by slot: one gather of their rows, each expert's MLP on a
    contiguous run, one weighted scatter-add back; one host sync (the run lengths). Pairs
    whose slot is len(w13) (another rank's expert) sort last and are dropped."""
    top_k, num_local = topk_ids.shape[1], w13.shape[0]
    slots = slot_of[topk_ids.flatten()]
    order = torch.argsort(slots, stable=True)
    runs = torch.bincount(slots, minlength=num_local + 1)[:num_local].tolist()
    order = order[:sum(runs)]
    tokens = order // top_k
    xs, ys, start = x[tokens], [], 0
    for i, count in enumerate(runs):
        if count:
            gate, up = F.linear(xs[start:start + count], w13[i]).chunk(2, dim=-1)
            ys.append(F.linear(F.silu(gate) * up, w2[i]))
        start += count
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if ys:
        out.index_add_(0, tokens,
                       torch.cat(ys).float() * topk_weights.flatten()[order].unsqueeze(-1))
    return out
