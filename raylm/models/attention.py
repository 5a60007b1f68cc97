"""Paged attention, torch path (CPU). The runner orders a batch decodes-first: the first
`num_decodes` tokens are one-token decodes, the rest are prefill chunks, one per request.

KV cache per layer: [2, num_kv_heads, num_blocks, block_size, head_dim] (head-major), with
K stored transposed inside each block ([head_dim, block_size]; V is [block_size, head_dim]).
Why: the compiled decode kernel (raylm.kernels.cpu_paged_attention) then reads both in
place with contiguous inner loops (transposing K tiles on the fly cost 3x its runtime).
The torch reference path gathers whole blocks with one `index_select` per K/V (the same
bytes as gathering slots with block_size times fewer indices: ~20x faster here).
Softmax always runs in fp32. Prefill uses torch SDPA in fp32; decode uses two bmm's in the
cache dtype (fp32 accumulation inside): torch's CPU SDPA is several times slower in bf16,
and for one query token the bmm's avoid SDPA's copies of strided K/V.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.kernels import cpu_paged_attention


@dataclass
class PrefillSeq:
    q_start: int  # row of this request's first query token in the batch
    q_len: int
    ctx_len: int  # tokens attended to, new ones included
    block_ids: Optional[torch.Tensor]  # blocks holding the context; None when nothing is cached yet


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes (block_id * block_size + offset)
    num_decodes: int = 0
    decode_block_table: Optional[torch.Tensor] = None  # [D, nb] padded block tables (int64)
    decode_lens: Optional[torch.Tensor] = None  # [D] context lengths, this step's token included
    decode_kernel: bool = False  # use the compiled CPU kernel (reads the cache in place)
    decode_mask: Optional[torch.Tensor] = None  # [D, 1, L] bool, True = attend (L = nb * block_size)
    prefills: List[PrefillSeq] = field(default_factory=list)
    store_kv: bool = True  # False for a lockstep dummy forward: it owns no cache slot


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.kv_cache: Optional[torch.Tensor] = None  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, Dh]; k, v: [T, Hkv, Dh] -> [T, Hq * Dh]."""
        if meta.store_kv:
            self._store(k, v, meta.slot_mapping)
        if not meta.prefills:
            return self._decode(q, meta).to(q.dtype).flatten(1)
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=torch.float32)
        if meta.num_decodes:
            out[:meta.num_decodes] = self._decode(q[:meta.num_decodes], meta)
        for seq in meta.prefills:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], seq)
        return out.to(q.dtype).flatten(1)

    def _k_view(self) -> torch.Tensor:
        """[Hkv, NB, Dh, BS]: K as stored (transposed within each block)."""
        _, h, nb, bs, d = self.kv_cache.shape
        return self.kv_cache[0].view(h, nb, d, bs)

    def _store(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        bs = self.kv_cache.shape[3]
        blocks, offsets = slots // bs, slots % bs
        dtype = self.kv_cache.dtype
        self._k_view()[:, blocks, :, offsets] = k.to(dtype)  # indexed view is [T, Hkv, Dh]
        self.kv_cache[1][:, blocks, offsets] = v.transpose(0, 1).to(dtype)  # [Hkv, T, Dh]

    def _gather(self, block_ids: torch.Tensor, num_seqs: int):
        """-> K, V as [Hkv, num_seqs, L, Dh] in the cache dtype; L = blocks per seq * block_size."""
        h, d = self.num_kv_heads, self.head_dim
        k = self._k_view().index_select(1, block_ids).view(h, num_seqs, -1, d, self.kv_cache.shape[3])
        v = self.kv_cache[1].index_select(1, block_ids).view(h, num_seqs, -1, d)
        return k.transpose(-1, -2).reshape(h, num_seqs, -1, d), v

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.decode_kernel:
            return cpu_paged_attention.paged_decode(q, self.kv_cache, meta.decode_block_table, meta.decode_lens,
                                                    self.scale)
        return self._decode_torch(q, meta)

    def _decode_torch(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Reference path, batched over (kv head, seq) in that order, so bmm reads the gather in place (the
        [seq, head] order would make matmul copy K and V first). Each kv head serves
        `group` consecutive query heads (HF's GQA layout)."""
        keys, values = self._gather(meta.decode_block_table.flatten(), meta.num_decodes)
        n, group = q.shape[0], self.num_heads // self.num_kv_heads
        query = q.view(n, self.num_kv_heads, group, self.head_dim).transpose(0, 1).to(keys.dtype)
        scores = torch.matmul(query, keys.transpose(-1, -2)).float().mul_(self.scale)  # [Hkv, S, G, L]
        probs = scores.masked_fill_(~meta.decode_mask, float("-inf")).softmax(-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [Hkv, S, G, Dh]
        return out.transpose(0, 1).reshape(n, self.num_heads, self.head_dim).float()

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PrefillSeq) -> torch.Tensor:
        query = q.float().transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, Dh]
        if seq.block_ids is None:  # nothing cached before this chunk: attend to the fresh K/V, causal
            keys = k.float().transpose(0, 1).unsqueeze(0)
            values = v.float().transpose(0, 1).unsqueeze(0)
            mask, causal = None, True
        else:
            keys, values = (x[:, :, :seq.ctx_len].float().transpose(0, 1) for x in self._gather(seq.block_ids, 1))
            # query i sits at position ctx_len - q_len + i and sees keys up to it
            rows = torch.arange(seq.q_len).unsqueeze(1) + (seq.ctx_len - seq.q_len)
            mask, causal = torch.arange(seq.ctx_len).unsqueeze(0) <= rows, False
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                             scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)
