"""The attention layer the models build: it holds no attention code of its own. The model
runner binds it to the worker's KV-cache pool; the pool's backend (raylm.attention: torch,
cpu, later triton) stores this step's K/V and runs paged attention in its own layout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raylm.attention import AttentionMetadata, KVCachePool, PrefillSeq  # noqa: F401  (re-exported)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.pool: Optional[KVCachePool] = None  # bound by the model runner
        self.layer_id = -1

    def bind(self, pool: KVCachePool, layer_id: int) -> None:
        self.pool, self.layer_id = pool, layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, Dh]; k, v: [T, Hkv, Dh] -> [T, Hq * Dh]."""
        if meta.store_kv:
            self.pool.store_kv(self.layer_id, k, v, meta.slot_mapping)
        out = self.pool.backend.forward(q, k, v, self.pool.layer(self.layer_id), meta, self.scale)
        return out.to(q.dtype).flatten(1)
