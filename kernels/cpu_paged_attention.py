"""CPU paged decode attention: a small C kernel (paged_attention_cpu.c) compiled at first use
and called through ctypes, with the torch path as reference and fallback.

Why C and not torch ops: a torch decode has to gather K/V into a dense copy first, which
on this CPU costs more than the attention itself (memory-bound; ~1 ms per layer at batch
32, context 272). The kernel reads the paged cache in place. Why ctypes and not a torch
extension: no torch headers or ninja, a ~1 s build. It shares torch's OpenMP runtime
(same libgomp soname), so the two never run competing thread pools.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
# Compiled with -ffast-math but linked without it: linking with -ffast-math pulls in
# crtfastmath.o (GCC < 13 does so even for -shared), whose constructor turns on flush-to-zero
# and denormals-are-zero for the whole process when the library loads, and every float op in
# the server (torch, request validation: 5e-324 == 0.0) would change behaviour.
_COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
_LINK = ["-shared", "-fopenmp"]
_FLAGS = _COMPILE + ["|"] + _LINK  # both go into the cache tag
_lib: Optional[ctypes.CDLL] = None
_failed = False
_lock = threading.Lock()


def _build(out_dir: Path) -> Path:
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode() + os.uname().machine.encode()).hexdigest()[:16]
    target = out_dir / f"paged_attention_cpu-{tag}.so"
    if target.exists():
        return target
    from raylm.config import c_compiler

    cc = c_compiler() or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_o, tmp_so = Path(tmp) / "kernel.o", Path(tmp) / target.name
        subprocess.run([cc, *_COMPILE, "-c", str(_SOURCE), "-o", str(tmp_o)], check=True, capture_output=True)
        subprocess.run([cc, *_LINK, str(tmp_o), "-o", str(tmp_so), "-lm"], check=True, capture_output=True)
        os.replace(tmp_so, target)  # atomic: concurrent builders race harmlessly
    return target


def load(out_dir: Optional[Path] = None) -> Optional[ctypes.CDLL]:
    """The compiled kernel library, or None if it cannot be built here (logged once)."""
    global _lib, _failed
    with _lock:
        if _lib is not None or _failed:
            return _lib
        try:
            from raylm.config import cache_dir

            lib = ctypes.CDLL(str(_build(out_dir or cache_dir() / "kernels")))
            i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
            for name in ("paged_decode_bf16", "paged_decode_f32"):
                fn = getattr(lib, name)
                fn.argtypes = [ptr, ptr, ptr, ptr, ptr] + [i64] * 7 + [f32]
                fn.restype = None
            _lib = lib
        except Exception as exc:  # no compiler, odd platform: the torch path still works
            _failed = True
            logger.warning("CPU paged-attention kernel unavailable, using the torch path: %s", exc)
        return _lib


def available() -> bool:
    return load() is not None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, Hq, D]; kv_cache [2, Hkv, NB, BS, D] (bf16 or fp32; K stored [D, BS] within a
    block, see raylm.models.attention); block_tables [S, max_nb] int64; context_lens [S]
    int64 -> [S, Hq, D] fp32."""
    lib = load()
    fn = {torch.bfloat16: lib.paged_decode_bf16, torch.float32: lib.paged_decode_f32}[kv_cache.dtype]
    q = q.float().contiguous()
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    assert kv_cache.is_contiguous() and tables.dtype == torch.int64 and lens.dtype == torch.int64
    _, hkv, nb, bs, d = kv_cache.shape
    s, hq, _ = q.shape
    out = torch.empty(s, hq, d, dtype=torch.float32)
    fn(q.data_ptr(), kv_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
       s, hq, hkv, d, nb, bs, tables.shape[1], scale)
    return out
