"""The Triton attention backend: the GPU path (raylm.kernels.triton_paged_attention), and on
CPU tensors under Triton's interpreter (the tests).

Layout per layer: [2, num_blocks, block_size, Hkv, Dh] (vLLM's: a token's heads together,
so the store is one contiguous row per token). One kernel launch per layer serves the
whole mixed batch; the step's metadata is flattened once per step into `cu_seqlens_q`,
`seq_lens` and one int32 block table, moved to the device together. Every tensor the
kernels read comes from the metadata, so a decode step replays as a CUDA graph once its
metadata sits in static buffers (raylm.executor.cuda_graphs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from raylm.attention.base import (AttentionMetadata, BaseAttentionBackend,
                                  register_attention_backend)
from raylm.kernels.triton_support import triton_runs_on


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    cu_seqlens_q: Optional[torch.Tensor] = None  # [S + 1] int32: each sequence's query rows
    # [S] int32: context lengths, this step's tokens included
    seq_lens: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None  # [S, max_blocks] int32
    max_query_len: int = 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@register_attention_backend("triton")
class TritonAttentionBackend(BaseAttentionBackend):
    @classmethod
    def supports(cls, device: torch.device, kv_dtype: torch.dtype) -> bool:
        return triton_runs_on(device) and kv_dtype in (torch.float32, torch.float16,
                                                       torch.bfloat16)

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.programs_wanted = 8  # split decode keys until about this many programs run
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self.programs_wanted = 2 * sms

    def kv_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int) -> Tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def store_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        from raylm.kernels.triton_kv_store import store_kv

        store_kv(k, v, cache[0], cache[1], slots)

    def build_metadata(self, meta: AttentionMetadata, block_size: int) -> TritonAttentionMetadata:
        q_lens = [1] * meta.num_decodes + [p.q_len for p in meta.prefills]
        ctx = meta.decode_lens.tolist() if meta.num_decodes else []
        ctx += [p.ctx_len for p in meta.prefills]
        blocks = [0 if p.block_ids is None else len(p.block_ids) for p in meta.prefills]
        width = max(blocks + [meta.decode_block_table.shape[1] if meta.num_decodes else 1, 1])
        table = torch.zeros(len(q_lens), width, dtype=torch.int32)
        if meta.num_decodes:  # one copy for every decode row
            table[:meta.num_decodes, :meta.decode_block_table.shape[1]] = meta.decode_block_table
        for i, p in enumerate(meta.prefills):
            if p.block_ids is not None:
                table[meta.num_decodes + i, :len(p.block_ids)] = p.block_ids
        # only what the kernels read goes to the device (not the per-kind tables it came from)
        full = TritonAttentionMetadata(
            meta.slot_mapping, meta.num_decodes,
            prefills=[replace(p, block_ids=None) for p in meta.prefills], store_kv=meta.store_kv,
            cu_seqlens_q=torch.tensor([0] + q_lens,
                                      dtype=torch.int32).cumsum(0, dtype=torch.int32),
            seq_lens=torch.tensor(ctx, dtype=torch.int32), block_table=table,
            max_query_len=max(q_lens, default=1))
        return full.to(self.device)

    def num_segments(self, num_seqs: int, num_kv_heads: int, max_query_len: int) -> int:
        """Split-KV for decode batches too small to fill the device (a power of two, <= 16).
        A function of the batch shape only: a captured graph keeps its choice."""
        if max_query_len != 1:
            return 1
        segments = 1
        while segments < 16 and num_seqs * num_kv_heads * segments < self.programs_wanted:
            segments *= 2
        return segments

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: TritonAttentionMetadata, scale: float) -> torch.Tensor:
        if not meta.store_kv:  # a dummy step: causal attention over its own fresh k, v
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=True)
            return out[0].transpose(0, 1)
        from raylm.kernels.triton_paged_attention import paged_attention

        out = torch.empty_like(q)
        segments = self.num_segments(meta.num_seqs, cache.shape[3], meta.max_query_len)
        return paged_attention(q, cache[0], cache[1], out, meta.cu_seqlens_q, meta.seq_lens,
                               meta.block_table, scale, meta.max_query_len, segments)
