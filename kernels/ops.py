"""The fused ops the model code calls, one function per op (its single call site picks the
implementation here): Triton kernels on CUDA, the C kernels on CPU (raylm.kernels.cpu_ops,
fp32 and bf16, when gcc built them), else the torch references (raylm.kernels.reference).

The mode is the engine's `fused_ops` option, resolved per device and set around each
forward with `using(mode)`: "triton" (CUDA; CPU tensors only under Triton's interpreter:
the tests), "cpu" (the C kernels where the dtype allows, else the references) or "torch"
(always the references: the switch for ruling a kernel out when outputs differ).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

import torch

from raylm.kernels import cpu_ops, reference
from raylm.kernels.triton_support import triton_runs_on, why_not

MODES = ("auto", "triton", "cpu", "torch")
_mode = "torch"


def check_mode(mode: str, device: torch.device) -> None:
    """Raise a ValueError when `mode` cannot run on `device`."""
    if mode not in MODES:
        raise ValueError(f"fused_ops must be one of {list(MODES)} (got {mode!r})")
    if mode == "triton" and not triton_runs_on(device):
        raise ValueError(f"fused_ops='triton': {why_not(device)}")
    if mode == "cpu" and not (device.type == "cpu" and cpu_ops.available()):
        raise ValueError("fused_ops='cpu' needs the CPU device and a C compiler (this is "
                         f"{device.type})")


def resolve(mode: str, device: torch.device) -> str:
    """"triton", "cpu" or "torch": what `mode` runs on `device`."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "triton" if triton_runs_on(device) else "torch"
    return "cpu" if cpu_ops.available() else "torch"


def mode() -> str:
    """The mode set by the innermost `using` ("torch" outside any)."""
    return _mode


@contextmanager
def using(mode: str) -> Iterator[None]:
    global _mode
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


@lru_cache(maxsize=None)
def _kernels(module: str):
    return importlib.import_module(f"raylm.kernels.{module}")


def _impl(x: torch.Tensor, triton_module: str):
    if _mode == "triton":
        return _kernels(triton_module)
    if _mode == "cpu" and x.dtype in cpu_ops.DTYPES:
        return cpu_ops
    return reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    """RMSNorm of x (or of x + residual, returning (normed, x + residual))."""
    if _mode == "cpu" and weight.dtype != x.dtype:
        return reference.rms_norm(x, weight, eps, residual)
    return _impl(x, "triton_layer_ops").rms_norm(x, weight, eps, residual)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, neox: bool = True):
    """Rotated (q, k); the Triton and C kernels rotate them in place."""
    return _impl(q, "triton_layer_ops").rotary(positions, q, k, cos, sin, neox)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x, "triton_layer_ops").silu_and_mul(x)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """fp32 [T, H]: each token's top-k experts held here, weighted and summed."""
    impl = _kernels("triton_moe") if _mode == "triton" else reference
    return impl.fused_moe(x, w13, w2, topk_weights, topk_ids, slot_of)
