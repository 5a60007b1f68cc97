"""`raylm bench kernels`: each kernel the engine runs against its torch reference, on this
device, with the bytes it must move and the FLOPs it must do, as a fraction of this
machine's limits measured in the same run (a large copy for memory bandwidth, a large GEMM
for compute; both below the vendor's peak figures, which the printout also names).

On CUDA the kernels are the Triton ones (raylm.kernels.triton_*); on CPU the C ones
(raylm.kernels.cpu_ops, the `cpu` attention backend, the bf16 GEMV against oneDNN). The
references are the torch paths the engine runs with `fused_ops=torch` /
`attention_backend=torch`; the MoE has no CPU kernel (one row, the reference).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from raylm.bench.report import machine_info, print_table, write_json
from raylm.bench.kernel_cases import SHAPES, build_cases


@dataclass
class Case:
    op: str
    shape: str
    bytes: float  # the least it must read and write
    flops: float
    ref: Callable[[], object]
    impl: Optional[Callable[[], object]] = None  # None: the engine runs the reference here
    impl_name: str = "torch"


def add_parser(sub, add_engine_args=None) -> None:
    p = sub.add_parser("kernels",
                       help="each kernel vs its torch reference, as a fraction of this machine's "
                            "limits")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 (CUDA), float32 (CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="model dimensions (default: llama-8b on CUDA, smollm2-135m on CPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (the median is reported)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_kernels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float = 0.05,
              stat: Callable = statistics.median) -> float:
    """Seconds per call (the median of the repeats, or `stat`): enough calls per repeat to
    fill `budget_s`, after warm-up."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    calls = max(1, int(budget_s / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return stat(samples)


def measure_limits(device: torch.device, dtype: torch.dtype, repeats: int) -> Dict[str, float]:
    """Bytes/s of a large copy and FLOP/s of a large GEMM on `device`, in this run: the best
    of the repeats (a limit; this machine's copy rate drifts by 2x between runs)."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src), device, repeats, stat=min)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_s = time_call(lambda: a @ b, device, repeats, stat=min)
    return {"bandwidth_gb_s": 2 * size / copy_s / 1e9, "gemm_tflop_s": 2 * n ** 3 / gemm_s / 1e12}


def run_case(case: Case, device: torch.device, repeats: int, limits: Dict[str, float]) -> dict:
    ref_s = time_call(case.ref, device, repeats)
    impl_s = time_call(case.impl, device, repeats) if case.impl is not None else ref_s
    gb_s, tflop_s = case.bytes / impl_s / 1e9, case.flops / impl_s / 1e12
    mem_frac, flop_frac = gb_s / limits["bandwidth_gb_s"], tflop_s / limits["gemm_tflop_s"]
    return {"op": case.op, "shape": case.shape,
            "impl": case.impl_name if case.impl else "torch (ref)", "impl_us": impl_s * 1e6,
            "ref_us": ref_s * 1e6, "speedup": ref_s / impl_s, "gb_s": gb_s, "tflop_s": tflop_s,
            "bound": "memory" if mem_frac >= flop_frac else "compute",
            "pct_of_limit": 100 * max(mem_frac, flop_frac)}


def cmd_kernels(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "cuda"
                          or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = args.shape or ("llama-8b" if device.type == "cuda" else "smollm2-135m")
    with torch.inference_mode():
        limits = measure_limits(device, dtype, args.repeats)
        rows = [run_case(c, device, args.repeats, limits)
                for c in build_cases(SHAPES[shape], device, dtype, Case)]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else machine_info()["processor"])
    print(f"{name}: copy {limits['bandwidth_gb_s']:.0f} GB/s, {dtype} GEMM "
          f"{limits['gemm_tflop_s']:.1f} TFLOP/s (measured here; % of limit is against these; "
          f"over 100%: the op's data stayed in cache). Shape: {shape}.")
    print_table(rows,
                [("op", "op"), ("shape", "shape"), ("impl", "impl"), ("impl_us", "impl us", ".1f"),
                 ("ref_us", "torch ref us", ".1f"), ("speedup", "x ref", ".2f"),
                 ("gb_s", "GB/s", ".1f"), ("tflop_s", "TFLOP/s", ".3f"), ("bound", "bound"),
                 ("pct_of_limit", "% of limit", ".1f")])
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "kernels", "device": str(device), "device_name": name,
                    "dtype": str(dtype), "shape": shape, "limits": limits,
                    "machine": machine_info(), "results": rows})
    return 0
