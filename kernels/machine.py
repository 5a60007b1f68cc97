"""What `dtype="auto"` picks on this machine, and why.

On CUDA: the checkpoint's half dtype (bf16 or fp16), bf16 for fp32 checkpoints where the GPU
has it (vLLM's rule). On CPU the silicon decides, so we look and measure:

- weights and activations: bf16 when the CPU multiplies bf16 natively (AVX512-BF16 or AMX):
  memory-bound decode reads half the bytes. Without it, fp32 (bf16 would be emulated).
- GEMMs above the GEMV's few rows (prefill, batched decode): oneDNN's prepacked GEMM in bf16
  and in fp32 are timed once per machine (cached beside the compiled kernels). Instances
  differ by 4x either way (an AMD EPYC ran bf16 at 768 GFLOP/s and fp32 at 182; an Intel
  Xeon 163 and 309), so the faster one is used: with bf16 weights and fp32 GEMMs the
  prepacked weight is held in fp32 and activations are cast around each GEMM.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PROBE_SHAPE = (256, 1024, 1024)  # M, K, N: a prefill chunk through a small model's projection
FP32_MARGIN = 1.25  # fp32 GEMMs only when clearly faster: they cost 2x the weight memory


@dataclass(frozen=True)
class GemmRates:
    """oneDNN prepacked GEMM rates on this machine, GFLOP/s (best of a few runs)."""

    bf16: float
    f32: float
    threads: int


@dataclass(frozen=True)
class DtypeChoice:
    """weights: the model's parameters and activations; gemm: what CPU GEMMs above the
    GEMV's rows compute in (the same as weights except bf16 weights with fp32 GEMMs)."""

    weights: torch.dtype
    gemm: torch.dtype
    reason: str


def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16(flags: Optional[frozenset] = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _gemm_seconds(dtype: torch.dtype, m: int, k: int, n: int, repeats: int) -> float:
    x = torch.randn(m, k).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(dtype), m)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms oneDNN's kernel cache
        start = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        best = min(best, time.perf_counter() - start)
    return best


def measure_gemm_rates(shape=PROBE_SHAPE, repeats: int = 5) -> GemmRates:
    """Time oneDNN's prepacked GEMM in bf16 and fp32 at `shape` (M, K, N); ~0.1 s."""
    m, k, n = shape
    flop = 2.0 * m * k * n
    rates = {d: flop / _gemm_seconds(d, m, k, n, repeats) / 1e9
             for d in (torch.bfloat16, torch.float32)}
    return GemmRates(bf16=rates[torch.bfloat16], f32=rates[torch.float32],
                     threads=torch.get_num_threads())


def _probe_path() -> Path:
    from raylm.config import cache_dir

    machine = f"{platform.machine()}|{sorted(cpu_flags())}|{_cpu_model()}|{torch.__version__}|" \
              f"{torch.get_num_threads()}"
    return (cache_dir() / "machine"
            / f"gemm-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gemm_rates() -> GemmRates:
    """This machine's GEMM rates: measured once, then read from the cache dir (a later start
    must pick the same, and two replicas starting at once would measure each other)."""
    path = _probe_path()
    try:
        return GemmRates(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    rates = measure_gemm_rates()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(rates)))
    os.replace(tmp, path)
    return rates


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_cuda_dtype(checkpoint: Optional[torch.dtype], bf16_ok: bool) -> torch.dtype:
    if checkpoint in (torch.bfloat16, torch.float16):
        return checkpoint if checkpoint != torch.bfloat16 or bf16_ok else torch.float16
    return torch.bfloat16 if bf16_ok else torch.float16


def choose_cpu_gemm(weights: torch.dtype, requested: str, rates_fn=gemm_rates) -> tuple:
    """(gemm dtype, why) for CPU weights in `weights`; `requested` is auto|bfloat16|float32."""
    if weights != torch.bfloat16:
        return weights, f"GEMMs in {_name(weights)}, as the weights"
    if requested != "auto":
        return getattr(torch, requested), f"GEMMs in {requested} (cpu_gemm_dtype)"
    r = rates_fn()
    gemm = torch.float32 if r.f32 >= FP32_MARGIN * r.bf16 else torch.bfloat16
    return gemm, (f"GEMMs in {_name(gemm)}: oneDNN measured {r.bf16:.0f} GFLOP/s bf16, "
                  f"{r.f32:.0f} fp32 at {'x'.join(map(str, PROBE_SHAPE))} on {r.threads} threads")


def choose_dtypes(dtype: str, device: torch.device, checkpoint: Optional[torch.dtype] = None,
                  cpu_gemm: str = "auto", flags: Optional[frozenset] = None,
                  rates_fn=gemm_rates) -> DtypeChoice:
    """Resolve the `dtype` option (auto or a torch dtype name) for `device`."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        weights = (choose_cuda_dtype(checkpoint, bf16_ok) if dtype == "auto"
                   else getattr(torch, dtype))
        return DtypeChoice(weights, weights, f"{_name(weights)} on CUDA (checkpoint {checkpoint})")
    if dtype == "auto":
        native = cpu_native_bf16(flags)
        weights = torch.bfloat16 if native else torch.float32
        why = ("the CPU has native bf16 (avx512_bf16/amx_bf16)" if native
               else "no native bf16 on this CPU")
    else:
        weights, why = getattr(torch, dtype), "asked for"
    gemm, gemm_why = choose_cpu_gemm(weights, cpu_gemm, rates_fn)
    return DtypeChoice(weights, gemm, f"weights {_name(weights)} ({why}); {gemm_why}")


@lru_cache(maxsize=None)
def auto_cpu_weights_dtype() -> str:
    """The weights dtype `auto` means on this CPU, by name (for references run beside raylm)."""
    return "bfloat16" if cpu_native_bf16() else "float32"
