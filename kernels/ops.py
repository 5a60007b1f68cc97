"""The fused ops the model code calls, one function per op (its single call site picks the
implementation here): the Triton kernel where the mode allows and Triton runs, else the
torch reference (raylm.kernels.reference).

The mode is the engine's `fused_ops` option, set around each forward with `using(mode)`:
"auto" runs Triton on CUDA tensors and the references elsewhere; "triton" runs Triton
wherever it runs (CPU tensors only under its interpreter: the tests); "torch" forces the
references (the switch for ruling a kernel out when outputs differ).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

import torch

from raylm.kernels import reference
from raylm.kernels.triton_support import HAS_TRITON, triton_runs_on, why_not

MODES = ("auto", "triton", "torch")
_mode = "auto"


def check_mode(mode: str, device: torch.device) -> None:
    """Raise a ValueError when `mode` cannot run on `device`."""
    if mode not in MODES:
        raise ValueError(f"fused_ops must be one of {list(MODES)} (got {mode!r})")
    if mode == "triton" and not triton_runs_on(device):
        raise ValueError(f"fused_ops='triton': {why_not(device)}")


def resolve(mode: str, device: torch.device) -> str:
    """"triton" or "torch": what `mode` runs on `device`."""
    if mode == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return mode


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


def _on_triton(t: torch.Tensor) -> bool:
    return _mode == "triton" or (_mode == "auto" and t.is_cuda and HAS_TRITON)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm of x (or of x + residual, returning (normed, x + residual))."""
    impl = _kernels("triton_layer_ops") if _on_triton(x) else reference
    return impl.rms_norm(x, weight, eps, residual)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           neox: bool = True):
    """Rotated (q, k); the Triton kernel rotates them in place."""
    impl = _kernels("triton_layer_ops") if _on_triton(q) else reference
    return impl.rotary(positions, q, k, cos, sin, neox)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    impl = _kernels("triton_layer_ops") if _on_triton(x) else reference
    return impl.silu_and_mul(x)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """fp32 [T, H]: each token's top-k experts held here, weighted and summed."""
    impl = _kernels("triton_moe") if _on_triton(x) else reference
    return impl.fused_moe(x, w13, w2, topk_weights, topk_ids, slot_of)
