"""Paged attention, torch path (CPU). The runner orders a batch decodes-first: the first
`num_decodes` tokens are one-token decodes, the rest are prefill chunks, one per request.

KV cache per layer: [2, num_blocks * block_size, num_kv_heads, head_dim] (flat slots;
slot = block_id * block_size + offset). Each step stores the new K/V at `slot_mapping`,
then attends over the request's slots. Attention math runs in fp32: torch's CPU SDPA is
several times slower in bf16 for decode (measured, see DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillSeq:
    q_start: int  # row of this request's first query token in the batch
    q_len: int
    ctx_len: int  # tokens attended to, new ones included
    slots: Optional[torch.Tensor]  # [ctx_len] cache slots; None when there is no cached prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decodes: int = 0
    decode_slots: Optional[torch.Tensor] = None  # [D, L] slots to gather (padded)
    decode_mask: Optional[torch.Tensor] = None  # [D, 1, 1, L] bool, True = attend
    prefills: List[PrefillSeq] = field(default_factory=list)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.kv_cache: Optional[torch.Tensor] = None  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]."""
        cache = self.kv_cache
        cache[0].index_copy_(0, meta.slot_mapping, k.to(cache.dtype))
        cache[1].index_copy_(0, meta.slot_mapping, v.to(cache.dtype))
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=torch.float32)
        if meta.num_decodes:
            out[:meta.num_decodes] = self._decode(q[:meta.num_decodes], meta)
        for seq in meta.prefills:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], seq)
        return out.to(q.dtype).flatten(1)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        keys = self.kv_cache[0][meta.decode_slots].float().transpose(1, 2)  # [D, Hkv, L, Dh]
        values = self.kv_cache[1][meta.decode_slots].float().transpose(1, 2)
        query = q.float().unsqueeze(2)  # [D, Hq, 1, Dh]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask,
                                             scale=self.scale, enable_gqa=True)
        return out.squeeze(2)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PrefillSeq) -> torch.Tensor:
        query = q.float().transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, Dh]
        if seq.slots is None:  # no cached prefix: attend to the fresh K/V, plain causal
            keys, values = k.float(), v.float()
            mask, causal = None, True
        else:
            keys, values = self.kv_cache[0][seq.slots].float(), self.kv_cache[1][seq.slots].float()
            # query i sits at position ctx_len - q_len + i and sees keys up to it
            offset = seq.ctx_len - seq.q_len
            rows = torch.arange(seq.q_len).unsqueeze(1) + offset
            mask, causal = torch.arange(seq.ctx_len).unsqueeze(0) <= rows, False
        keys = keys.transpose(0, 1).unsqueeze(0)
        values = values.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                             scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)
