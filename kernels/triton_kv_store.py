"""Writing a step's new K/V into the paged cache by slot mapping, in Triton (reference:
reference.store_kv). The cache is two views [num_blocks, block_size, Hkv, D]; slot = block *
block_size + offset; a negative slot (a padded row of a replayed decode graph) is skipped."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_vt,
                     stride_cb, stride_cs, stride_vb, stride_vs,
                     WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token per program; its Hkv * D values are contiguous in both k and the cache."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    cols = tl.arange(0, WIDTH_PAD)
    ok = cols < WIDTH
    k = tl.load(k_ptr + t * stride_kt + cols, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + cols, mask=ok)
    tl.store(k_cache_ptr + block * stride_cb + offset * stride_cs + cols,
             k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + block * stride_vb + offset * stride_vs + cols,
             v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (each token's heads contiguous) -> the caches at `slots` [T]."""
    tokens, hkv, d = k.shape
    if tokens == 0:
        return
    assert k.stride(1) == d and v.stride(1) == d and k.stride(2) == 1 and v.stride(2) == 1, \
        "store_kv wants each token's K/V heads contiguous"
    width = hkv * d
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0),
                                k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                                v_cache.stride(1), WIDTH=width,
                                WIDTH_PAD=triton.next_power_of_2(width),
                                BLOCK_SIZE=k_cache.shape[1])
