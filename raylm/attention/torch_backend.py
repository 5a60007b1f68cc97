"""The reference attention backend: plain torch ops, any device.

Layout per layer: [2, Hkv, num_blocks, block_size, Dh] (head-major). Decode gathers each
sequence's whole blocks with one `index_select` per K/V (the same bytes as gathering slots,
with block_size times fewer indices) and runs two matmuls in the cache dtype (fp32
accumulation inside), masked past each length; prefill runs SDPA in fp32, per sequence,
over its cached context plus the new tokens. Softmax always runs in fp32.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from raylm.attention.base import (AttentionMetadata, BaseAttentionBackend, PrefillSeq,
                                  register_attention_backend)


@register_attention_backend("torch")
class TorchAttentionBackend(BaseAttentionBackend):
    def kv_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int) -> Tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def store_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        bs = cache.shape[3]
        blocks, offsets = slots // bs, slots % bs
        cache[0][:, blocks, offsets] = k.transpose(0, 1).to(cache.dtype)  # [Hkv, T, Dh]
        cache[1][:, blocks, offsets] = v.transpose(0, 1).to(cache.dtype)

    def gather(self, cache: torch.Tensor, block_ids: torch.Tensor, num_seqs: int):
        """-> K, V as [Hkv, num_seqs, L, Dh] in the cache dtype; L = blocks per seq *
        block_size."""
        h, d = cache.shape[1], cache.shape[4]
        k = cache[0].index_select(1, block_ids).view(h, num_seqs, -1, d)
        v = cache[1].index_select(1, block_ids).view(h, num_seqs, -1, d)
        return k, v

    def build_metadata(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        if meta.num_decodes and meta.decode_mask is None:
            width = meta.decode_block_table.shape[1] * block_size
            meta.decode_mask = (torch.arange(width) < meta.decode_lens.unsqueeze(1))[:, None, :]
        return meta.to(self.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not meta.prefills:
            return self.decode(q, cache, meta, scale)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        if meta.num_decodes:
            out[:meta.num_decodes] = self.decode(q[:meta.num_decodes], cache, meta, scale)
        for seq in meta.prefills:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            out[rows] = self.prefill(q[rows], k[rows], v[rows], cache, seq, scale)
        return out

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Batched over (kv head, seq) in that order, so matmul reads the gather in place (the
        [seq, head] order would make it copy K and V first). Each kv head serves `group`
        consecutive query heads (HF's GQA layout)."""
        keys, values = self.gather(cache, meta.decode_block_table.flatten(), meta.num_decodes)
        n, hq, d = q.shape
        hkv = cache.shape[1]
        query = q.view(n, hkv, hq // hkv, d).transpose(0, 1).to(keys.dtype)
        scores = torch.matmul(query, keys.transpose(-1, -2)).float().mul_(scale)  # [Hkv, S, G, L]
        probs = scores.masked_fill_(~meta.decode_mask, float("-inf")).softmax(-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [Hkv, S, G, Dh]
        return out.transpose(0, 1).reshape(n, hq, d).float()

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                seq: PrefillSeq, scale: float) -> torch.Tensor:
        query = q.float().transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, Dh]
        # nothing cached before this chunk: attend to the fresh K/V, causal
        if seq.ctx_len == seq.q_len:
            keys = k.float().transpose(0, 1).unsqueeze(0)
            values = v.float().transpose(0, 1).unsqueeze(0)
            mask, causal = None, True
        else:
            keys, values = (x[:, :, :seq.ctx_len].float().transpose(0, 1)
                            for x in self.gather(cache, seq.block_ids, 1))
            # query i sits at position ctx_len - q_len + i and sees keys up to it
            rows = (torch.arange(seq.q_len, device=q.device).unsqueeze(1)
                    + (seq.ctx_len - seq.q_len))
            mask, causal = torch.arange(seq.ctx_len, device=q.device).unsqueeze(0) <= rows, False
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
