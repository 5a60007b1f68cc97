"""The paged KV cache of one worker: every attention layer's blocks in one buffer.

The pool owns the device, the dtype, the layout (the attention backend's `kv_shape`), the
allocation and the writes (`store_kv`); layers read their slice through `layer(i)`. On CPU
the buffer is an anonymous mapping advised for huge pages (raylm.kernels.hugepages; decode
attention reads blocks scattered over it, though no speedup was measurable): the OS maps zero pages
on first write, so a replica's resident memory follows what it has used, not its whole budget. On
CUDA it is one `torch.zeros`: a padded row of a replayed decode graph reads block 0, which may
never have been written, and must read finite values.
"""
from __future__ import annotations

import math

import torch

from raylm.attention.base import BaseAttentionBackend
from raylm.kernels import hugepages


class KVCachePool:
    def __init__(self, backend: BaseAttentionBackend, num_layers: int, num_blocks: int,
                 block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.backend, self.device, self.dtype = backend, backend.device, dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, *backend.kv_shape(num_blocks, block_size, num_kv_heads, head_dim))
        self.buffer = hugepages.empty(shape, dtype) if self.device.type == "cpu" else \
            torch.zeros(shape, dtype=dtype, device=self.device)
        self.layers = list(self.buffer.unbind(0))  # views made once, not per layer per step

    @staticmethod
    def bytes_per_block(backend: BaseAttentionBackend, num_layers: int, block_size: int,
                        num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * math.prod(backend.kv_shape(1, block_size, num_kv_heads,
                                                       head_dim)) * dtype.itemsize

    def layer(self, i: int) -> torch.Tensor:
        return self.layers[i]

    def store_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.backend.store_kv(self.layers[i], k, v, slots)

