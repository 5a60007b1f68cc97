"""The decoder's element-wise ops in Triton: fused residual-add + RMSNorm, rotary embedding
in place on q and k (neox and interleaved pairs), SiLU-and-mul. Their torch references, of
the same names, are in raylm.kernels.reference (what the model runs off CUDA).

The kernels compute in fp32 and round once on store; the references follow HF transformers
(RMSNorm in fp32, rotary and SiLU in the activation dtype), so the two agree exactly in fp32
and to rounding in fp16/bf16.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o,
                     stride_ro, eps, size, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 in large buffers
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum is rounded to the activation dtype first, as x + residual is
        x += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
        x = x.to(tl.float32)
    # IEEE, not approximate: fp32 parity
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, 0) / size + eps))
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
             residual_out: Optional[torch.Tensor] = None):
    """RMSNorm over the last dim; with `residual`, of x + residual, returning (out, x +
    residual)."""
    shape, size = x.shape, x.shape[-1]
    x2 = x.reshape(-1, size)
    out = torch.empty_like(x2) if out is None else out.view(-1, size)
    res2 = res_out = x2  # placeholders when there is no residual
    if residual is not None:
        res2 = residual.reshape(-1, size)
        res_out = torch.empty_like(x2) if residual_out is None else residual_out.view(-1, size)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, x2.stride(0),
                                         res2.stride(0), out.stride(0), res_out.stride(0), eps,
                                         size, BLOCK=triton.next_power_of_2(size),
                                         HAS_RESIDUAL=residual is not None)
    return out.view(shape) if residual is None else (out.view(shape), res_out.view(shape))


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, num_heads, half,
                   HEADS: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr):
    """One token's heads of q or k, rotated in place: pairs (i, i + half) (neox) or (2i, 2i +
    1)."""
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, HALF)
    h = tl.arange(0, HEADS)
    cos = tl.load(cos_ptr + pos * half + i, mask=i < half)[None, :]
    sin = tl.load(sin_ptr + pos * half + i, mask=i < half)[None, :]
    if NEOX:
        first, second = i, i + half
    else:
        first, second = 2 * i, 2 * i + 1
    ok = (h[:, None] < num_heads) & (i[None, :] < half)
    base = x_ptr + t * stride_t + h[:, None] * stride_h
    x1 = tl.load(base + first[None, :], mask=ok).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=ok).to(tl.float32)
    tl.store(base + first[None, :], (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(base + second[None, :], (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, neox: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (the last dim contiguous); cos, sin:
    fp32 [max_position, D // 2]. Returns q, k."""
    half = cos.shape[1]
    for x in (q, k):
        if x.shape[0]:
            assert x.stride(2) == 1, "rotary wants the head dim contiguous"
            _rotary_kernel[(x.shape[0],)](x, positions, cos, sin, x.stride(0), x.stride(1),
                                          x.shape[1], half,
                                          HEADS=triton.next_power_of_2(x.shape[1]),
                                          HALF=triton.next_power_of_2(half), NEOX=neox)
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, size, BLOCK: tl.constexpr):
    row, col_block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=ok).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, 2I] (gate then up) -> silu(gate) * up [N, I]."""
    rows, size = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, size, dtype=x.dtype, device=x.device) if out is None else out
    block = min(1024, triton.next_power_of_2(size))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](x, out, x.stride(0), out.stride(0),
                                                               size, BLOCK=block)
    return out
