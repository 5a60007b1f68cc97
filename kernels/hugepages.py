"""CPU tensors on transparent huge pages (2 MiB), for what decode streams every step: the
weights the GEMV reads and the paged KV cache.

Why: on these VMs a TLB miss costs a two-level page walk; streaming SmolLM2's 212 MB of
layer weights through 4 KiB pages ran the C GEMV at ~31 GB/s, through huge pages at ~36
(and a plain read loop went from 30 to 56 GB/s). Anonymous mappings are zero-filled and
mapped on first touch, so a KV cache's resident memory still follows its use. Where the
kernel does not do THP (or not on madvise), the same memory comes in small pages.
"""
from __future__ import annotations

import math
import mmap
from typing import List, Sequence

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each packed tensor starts on a cache line


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor (zero-filled) in its own anonymous mapping, 2 MiB-aligned and advised
    for huge pages. The mapping lives as long as the tensor or a view of it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mm, dtype=torch.uint8)  # holds `mm`
    start = (-raw.data_ptr()) % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(*shape)


def pack(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Copies of `tensors` (any dtypes) in one huge-page mapping, same shapes, contiguous:
    one mapping, so small tensors do not each round up to a 2 MiB page."""
    sizes = [-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in tensors]
    arena = empty((sum(sizes),), torch.uint8)
    out, offset = [], 0
    for t, size in zip(tensors, sizes):
        nbytes = t.numel() * t.element_size()
        view = arena[offset:offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
        offset += size
    return out
