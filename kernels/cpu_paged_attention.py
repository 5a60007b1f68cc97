"""CPU paged decode attention: a small C kernel (paged_attention_cpu.c) compiled at first use
and called through ctypes (raylm.kernels.cpu_build), with the torch path as reference and
fallback.

Why C and not torch ops: a torch decode has to gather K/V into a dense copy first, which
on this CPU costs more than the attention itself (memory-bound; ~1 ms per layer at batch
32, context 272). The kernel reads the paged cache in place.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from raylm.kernels.cpu_build import CLibrary

_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_LIB = CLibrary("paged_attention_cpu.c", {name: [_PTR] * 5 + [_I64] * 7 + [_F32]
                                          for name in ("paged_decode_bf16", "paged_decode_f32")})


def load(out_dir: Optional[Path] = None) -> Optional[ctypes.CDLL]:
    """The compiled kernel library, or None if it cannot be built here (logged once)."""
    return _LIB.load(out_dir)


def available() -> bool:
    return load() is not None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, Hq, D]; kv_cache [2, Hkv, NB, BS, D] (bf16 or fp32; K stored [D, BS] within a
    block, see raylm.models.attention); block_tables [S, max_nb] int64; context_lens [S]
    int64 -> [S, Hq, D] fp32."""
    lib = load()
    fn = {torch.bfloat16: lib.paged_decode_bf16,
          torch.float32: lib.paged_decode_f32}[kv_cache.dtype]
    q = q.float().contiguous()
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    assert kv_cache.is_contiguous() and tables.dtype == torch.int64 and lens.dtype == torch.int64
    _, hkv, nb, bs, d = kv_cache.shape
    s, hq, _ = q.shape
    out = torch.empty(s, hq, d, dtype=torch.float32)
    fn(q.data_ptr(), kv_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
       s, hq, hkv, d, nb, bs, tables.shape[1], scale)
    return out
