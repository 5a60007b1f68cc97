"""The CPU attention backend: decode through the compiled C kernel, which reads the paged
cache in place (raylm.kernels.cpu_paged_attention); prefill as the torch backend.

Layout: the torch backend's, except that K is stored transposed inside each block
([Dh, block_size]; V stays [block_size, Dh]), so the kernel reads both with contiguous
inner loops (transposing K tiles on the fly cost 3x its runtime). Used on CPU whenever the
kernel builds (a C compiler is present) and the cache is fp32 or bf16.
"""
from __future__ import annotations

import torch

from raylm.attention.base import AttentionMetadata, register_attention_backend
from raylm.attention.torch_backend import TorchAttentionBackend
from raylm.kernels import cpu_ops, cpu_paged_attention


@register_attention_backend("cpu")
class CpuAttentionBackend(TorchAttentionBackend):
    @classmethod
    def supports(cls, device: torch.device, kv_dtype: torch.dtype) -> bool:
        return (device.type == "cpu" and kv_dtype in (torch.float32, torch.bfloat16)
                and cpu_paged_attention.available())

    @staticmethod
    def _k_view(cache: torch.Tensor) -> torch.Tensor:
        """[Hkv, NB, Dh, BS]: K as stored (transposed within each block)."""
        _, h, nb, bs, d = cache.shape
        return cache[0].view(h, nb, d, bs)

    def store_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        d = k.shape[2]
        if (k.dtype == v.dtype == cache.dtype and k.stride()[1:] == v.stride()[1:] == (d, 1)
                and cpu_ops.available()):
            return cpu_ops.store_kv(cache, k, v, slots)  # one C call for the two index_puts below
        bs = cache.shape[3]
        blocks, offsets = slots // bs, slots % bs
        # indexed view is [T, Hkv, Dh]
        self._k_view(cache)[:, blocks, :, offsets] = k.to(cache.dtype)
        cache[1][:, blocks, offsets] = v.transpose(0, 1).to(cache.dtype)  # [Hkv, T, Dh]

    def gather(self, cache: torch.Tensor, block_ids: torch.Tensor, num_seqs: int):
        h, bs, d = cache.shape[1], cache.shape[3], cache.shape[4]
        k = self._k_view(cache).index_select(1, block_ids).view(h, num_seqs, -1, d, bs)
        v = cache[1].index_select(1, block_ids).view(h, num_seqs, -1, d)
        return k.transpose(-1, -2).reshape(h, num_seqs, -1, d), v

    def build_metadata(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        return meta  # the kernel needs no mask; already on the CPU

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        return cpu_paged_attention.paged_decode(q, cache, meta.decode_block_table,
                                                meta.decode_lens, scale)
