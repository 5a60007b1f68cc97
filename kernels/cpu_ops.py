"""The fused element-wise ops for CPU (cpu_ops.c through ctypes): add + RMSNorm, rotary in
place, SiLU-and-mul, and the cpu attention backend's KV store, with the same names and
arguments as their references (raylm.kernels.reference). fp32 and bf16; the dispatcher
(raylm.kernels.ops) sends other dtypes, and everything when the library cannot build
(no compiler), to the references."""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import torch

from raylm.kernels.cpu_build import CLibrary

_I64, _F32, _PTR, _INT = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "add_rms_norm": [_PTR] * 5 + [_I64] * 4 + [_F32],
    "rotary": [_PTR] * 5 + [_I64] * 6 + [_INT],
    "silu_and_mul": [_PTR] * 2 + [_I64] * 3,
    "store_kv": [_PTR] * 4 + [_I64] * 7,
    "sample_rows": [_PTR] + [_I64] * 3 + [_PTR] * 3,
    "mask_rows": [_PTR] + [_I64] * 2 + [_PTR, _I64, _PTR, _I64],
}
_LIB = CLibrary("cpu_ops.c",
                {**{f"{name}_{s}": args for name, args in _SIGNATURES.items()
                    for s in ("f32", "bf16")},
                 "gemv_bf16": [_PTR] * 4 + [_I64] * 3})
# Above this oneDNN's prepacked GEMM wins. Measured on SmolLM2's 120 layer weights, cycled so
# none stays in cache: 1-2 rows 1.6x faster than oneDNN, 4 rows equal, 6 and more slower.
GEMV_MAX_ROWS = 4
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_empty = torch.empty  # every output allocation (tests poison them through this)


_FNS: Dict[Tuple[str, torch.dtype], Callable] = {}  # resolved once: these run ~10 times a layer


def available() -> bool:
    return _LIB.load() is not None


def _fn(name: str, dtype: torch.dtype):
    fn = _FNS.get((name, dtype))
    if fn is None:
        fn = _FNS[name, dtype] = getattr(_LIB.load(), f"{name}_{DTYPES[dtype]}")
    return fn


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a contiguous last dim (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    x2 = _rows(x)
    out = _empty(*x2.shape, dtype=x.dtype)
    r2 = res_out = None
    if residual is not None:
        r2, res_out = _rows(residual), _empty(*x2.shape, dtype=x.dtype)
    _fn("add_rms_norm", x.dtype)(x2.data_ptr(), None if r2 is None else r2.data_ptr(),
                                 weight.data_ptr(), out.data_ptr(),
                                 None if res_out is None else res_out.data_ptr(), x2.shape[0],
                                 x2.shape[1], x2.stride(0), 0 if r2 is None else r2.stride(0), eps)
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, neox: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place on q [T, Hq, D] and k [T, Hkv, D] (each token's heads contiguous)."""
    d = q.shape[2]
    assert q.stride(1) == d and k.stride(1) == d and q.stride(2) == 1 and k.stride(2) == 1
    _fn("rotary", q.dtype)(q.data_ptr(), k.data_ptr(), positions.contiguous().data_ptr(),
                           cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[1], k.shape[1],
                           q.stride(0), k.stride(0), d, int(neox))
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    n = x2.shape[1] // 2
    out = _empty(x2.shape[0], n, dtype=x.dtype)
    _fn("silu_and_mul", x.dtype)(x2.data_ptr(), out.data_ptr(), x2.shape[0], n, x2.stride(0))
    return out.view(*x.shape[:-1], n)


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into the cpu backend's cache [2, Hkv, NB, BS, D] (K transposed per
    block)."""
    _, hkv, nb, bs, d = cache.shape
    assert cache.is_contiguous() and k.stride(1) == d and v.stride(1) == d and k.stride(2) == 1
    _fn("store_kv", cache.dtype)(k.data_ptr(), v.data_ptr(), cache.data_ptr(),
                                 slots.contiguous().data_ptr(), k.shape[0], hkv, d, nb, bs,
                                 k.stride(0), v.stride(0))


def sample_rows(logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [rows, vocab] (fp32 or bf16): argmax where temps is 0,
    else an inverse-CDF draw from softmax(logits / T) with the row's uniform u (fp32)."""
    assert logits.stride(1) == 1 and temps.dtype == u.dtype == torch.float32
    out = _empty(logits.shape[0], dtype=torch.int64)
    _fn("sample_rows", logits.dtype)(logits.data_ptr(), logits.shape[0], logits.shape[1],
                                     logits.stride(0), temps.contiguous().data_ptr(),
                                     u.contiguous().data_ptr(), out.data_ptr())
    return out


def mask_rows(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] (int32 words) is clear."""
    assert logits.stride(1) == 1 and bitmask.dtype == torch.int32 and rows.dtype == torch.int64
    bitmask, rows = bitmask.contiguous(), rows.contiguous()
    _fn("mask_rows", logits.dtype)(logits.data_ptr(), logits.stride(0), logits.shape[1],
                                   bitmask.data_ptr(), bitmask.shape[1], rows.data_ptr(),
                                   rows.shape[0])


@lru_cache(maxsize=None)
def gemv_available() -> bool:
    """The bf16 GEMV was built with AVX512-BF16 (else it exists but is slow: not used)."""
    lib = _LIB.load()
    if lib is None:
        return False
    lib.gemv_bf16_fast.restype = ctypes.c_int
    return bool(lib.gemv_bf16_fast())


def gemv(x: torch.Tensor, weight: torch.Tensor,
         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias), bf16 in and out, for M <= a few rows."""
    x = x.contiguous()
    out = _empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    _fn("gemv", torch.bfloat16)(x.data_ptr(), weight.data_ptr(),
                                None if bias is None else bias.data_ptr(), out.data_ptr(),
                                x.shape[0], weight.shape[0], x.shape[1])
    return out
