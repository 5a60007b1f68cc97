"""Whether Triton kernels can run on a device: on CUDA when Triton is installed, and on CPU
tensors only under Triton's interpreter (TRITON_INTERPRET=1, which the test suite sets).

The kernel modules (triton_*.py) import Triton at the top, so they are imported lazily by
their callers, only once `triton_runs_on` said yes: raylm imports without Triton.
"""
from __future__ import annotations

import importlib.util

import torch

from raylm.config import triton_interpret

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """CUDA of compute capability 8.0 or newer (bf16 dots), or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and triton_interpret()


def why_not(device: torch.device) -> str:
    """The reason `triton_runs_on(device)` is False, for error messages."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return "raylm's Triton kernels need a GPU of compute capability 8.0 or newer"
    return ("Triton runs on CUDA, or on CPU only under its interpreter (TRITON_INTERPRET=1); "
            f"this is {device.type}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots exact (IEEE), not TF32: the fp32 paths are the ones compared token for token."""
    return "ieee" if dtype == torch.float32 else "tf32"
