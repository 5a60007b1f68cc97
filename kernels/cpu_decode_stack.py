"""A dense decoder stack's decode step in one C call (cpu_decode_stack.c through ctypes): the
per-op C kernels in the same order and roundings, without ~10 dispatches per layer.

The caller (raylm.models.fused_decode) describes each layer once with `DecodeLayer` (weight
and KV-cache pointers) and the stack with `DecodeDims`, and keeps the tensors alive."""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple

import torch

from raylm.kernels.cpu_build import CLibrary

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_LIB = CLibrary("cpu_decode_stack.c",
                {"decode_stack_bf16": [_PTR, _I64, _PTR] + [_PTR] * 8 + [_I64] * 2,
                 "decode_attention_bf16": [_PTR] * 8 + [_I64] * 2},
                includes=("cpu_ops.c", "paged_attention_cpu.c"))


class DecodeLayer(ctypes.Structure):
    """One layer: bf16 norm weights, plain [N, K] projection weights (b_qkv may be NULL) and
    the layer's cache [2, Hkv, NB, BS, D] in the cpu attention backend's layout."""

    _fields_ = [(name, _PTR) for name in
                ("ln1", "ln2", "w_qkv", "b_qkv", "w_o", "w_gate_up", "w_down", "cache")]


class DecodeDims(ctypes.Structure):
    """Shapes shared by the layers; cos/sin are the fp32 rotary tables [max_position, D/2]."""

    _fields_ = ([(name, _I64)
                 for name in ("hidden", "hq", "hkv", "head_dim", "inter", "num_blocks",
                              "block_size")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _PTR),
                   ("sin", _PTR), ("neox", _I64)])


def available() -> bool:
    return _LIB.load() is not None


def layer_array(layers: Sequence[DecodeLayer]) -> ctypes.Array:
    return (DecodeLayer * len(layers))(*layers)


def decode_stack(layers: ctypes.Array, dims: DecodeDims, x: torch.Tensor,
                 residual: Optional[torch.Tensor], positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, hidden] bf16 (+ residual, None before the first layer) through every layer, one
    decode token per row: stores this step's K/V and returns (x, residual) as the layers do.
    positions, slots, lens [M] and tables [M, max_nb] are int64."""
    m, h = x.shape
    assert x.is_contiguous() and x.dtype == torch.bfloat16 and tables.dtype == torch.int64
    tables, lens, slots, positions = (t.contiguous() for t in (tables, lens, slots, positions))
    out, res_out = torch.empty(m, h, dtype=x.dtype), torch.empty(m, h, dtype=x.dtype)
    _LIB.load().decode_stack_bf16(ctypes.addressof(layers), len(layers), ctypes.addressof(dims),
                                  x.data_ptr(),
                                  None if residual is None else residual.contiguous().data_ptr(),
                                  out.data_ptr(), res_out.data_ptr(), positions.data_ptr(),
                                  slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), m,
                                  tables.shape[1])
    return out, res_out


def decode_attention(layers: ctypes.Array, index: int, dims: DecodeDims, qkv: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor:
    """Layer `index`'s attention for a decode batch: qkv [M, (hq + 2 hkv) D] bf16 (rotated in
    place), K/V stored, -> [M, hq D] bf16. Index tensors int64 and contiguous."""
    m = qkv.shape[0]
    assert qkv.is_contiguous() and qkv.dtype == torch.bfloat16
    out = torch.empty(m, dims.hq * dims.head_dim, dtype=qkv.dtype)
    _LIB.load().decode_attention_bf16(ctypes.addressof(layers) + index
                                      * ctypes.sizeof(DecodeLayer), ctypes.addressof(dims),
                                      qkv.data_ptr(), out.data_ptr(), positions.data_ptr(),
                                      slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), m,
                                      tables.shape[1])
    return out
