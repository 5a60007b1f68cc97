"""`raylm bench sim-check`: the simulated executor's step times against the real executor's,
on this machine, for one model at several decode batch sizes.

The simulator is given this machine as its device, with limits measured here: the bytes/s
at which this CPU streams the model's weights through the engine's own 1-row GEMV (every
layer's weights once, as a decode step reads them; where the GEMV is not built, a large
copy's bytes/s as `raylm bench kernels` measures it) and the GEMM rate of the model's own
layer shapes at 8 to 256 rows, in the weights' dtype (a CPU's skinny GEMMs run far below its
large-GEMM rate, so one FLOP/s figure would not do), and as its fixed cost per step this
engine's input preparation and sampling at the smallest batch. Then for each batch size
the full model's real decode steps are timed (the executor's part: inputs, forward, logits,
sampling) and compared with the roofline time the simulator would sleep for the same batch.
Prints a table (ratio sim / real) and writes JSON.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Tuple

from raylm.bench.report import machine_info, print_table, write_json

AIM = 0.30  # the bound on |sim / real - 1|


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("sim-check",
                       help="the simulated executor's step times against real ones, here")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_sim_check)


def gemm_curve(model, dtype, rows=(8, 32, 64, 128, 256)) -> Tuple[Tuple[int, float], ...]:
    """(rows, FLOP/s) of the model's linear layers (q/k/v, o, gate+up, down, LM head; each
    timed, best of 5) at each row count. From 8 rows: the engine runs steps of up to 4 rows
    through its fused CPU decode kernel, which streams the weights (the memory term)."""
    import torch

    from raylm.bench.kernels import time_call

    shapes = _shapes(model) + [(model.hidden, model.vocab)]
    weights = [torch.randn(n, k).to(dtype) for k, n in shapes]
    curve = []
    for m in rows:
        xs = [torch.randn(m, k).to(dtype) for k, _ in shapes]
        best = time_call(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)],
                         torch.device("cpu"), repeats=5, stat=min)
        curve.append((m, 2 * m * sum(k * n for k, n in shapes) / best))
    return tuple(curve)


def _shapes(model):
    """(in, out) of one layer's linear weights (q/k/v fused, o, gate+up fused, down)."""
    qkv = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    return [(model.hidden, qkv), (model.num_heads * model.head_dim, model.hidden),
            (model.hidden, 2 * model.intermediate), (model.intermediate, model.hidden)]


def stream_bandwidth(model, dtype) -> Optional[float]:
    """Bytes/s of the engine's bf16 GEMV at 1 row over a whole model's worth of weights
    (every layer's, then the LM head; none stays in cache), best of 5; None where the GEMV
    is not built or the weights are not bf16."""
    import torch

    from raylm.bench.kernels import time_call
    from raylm.kernels import cpu_ops

    if dtype != torch.bfloat16 or not cpu_ops.gemv_available():
        return None
    shapes = _shapes(model) * model.num_layers + [(model.hidden, model.vocab)]
    weights = [torch.randn(n, k).to(dtype) for k, n in shapes]
    xs = {k: torch.randn(1, k).to(dtype) for k, _ in shapes}
    best = time_call(lambda: [cpu_ops.gemv(xs[w.shape[1]], w) for w in weights],
                     torch.device("cpu"), repeats=5, stat=min)
    return sum(w.numel() * w.element_size() for w in weights) / best


def executor_ms(kwargs: Dict, batch: int, input_len: int,
                steps: int) -> Tuple[float, float, object]:
    """Median ms of the executor's part of a decode step at `batch`, of the part of it outside
    the model (input preparation and sampling), and the weights' dtype."""
    from raylm import LLM
    from raylm.bench.step import _fill, time_steps

    llm = LLM(**{**kwargs, "max_model_len": input_len + steps + 64})
    _fill(llm, batch, input_len, steps + 10, 1.0, 0)
    med = time_steps(llm, steps)
    dtype = next(llm.engine.core.executor.worker.runner.model.parameters()).dtype
    llm.engine.core.shutdown()
    return med["total"] - med["schedule"] - med["update"], med["prepare"] + med["sample"], dtype


def cmd_sim_check(args: argparse.Namespace) -> int:
    import torch

    from raylm.bench.kernels import measure_limits
    from raylm.executor.roofline import DeviceProfile, ModelShape, step_time
    from raylm.models.loader import load_hf_config, resolve_model_path
    from raylm.options import engine_kwargs

    kwargs = engine_kwargs(args)
    ctx = args.input_len + 5 + args.steps // 2  # the median step's context (5 warm-up steps)
    real = {b: executor_ms(kwargs, b, args.input_len, args.steps) for b in args.batch_size}
    dtype = next(iter(real.values()))[2]
    fixed_ms = real[min(real)][1]  # this engine's own per-step cost, from the smallest batch
    model = ModelShape.from_hf_config(load_hf_config(resolve_model_path(kwargs["model"])),
                                      dtype_bytes=dtype.itemsize)
    with torch.inference_mode():
        limits = measure_limits(torch.device("cpu"), dtype, repeats=5)
        curve = gemm_curve(model, dtype)
        stream = stream_bandwidth(model, dtype)
    limits["stream_gb_s"] = stream / 1e9 if stream else None
    bandwidth = stream or limits["bandwidth_gb_s"] * 1e9
    device = DeviceProfile("this CPU (measured)", bandwidth, limits["gemm_tflop_s"] * 1e12, 0,
                           step_overhead_s=fixed_ms / 1e3, gemm_curve=curve)
    rows = []
    for batch, (real_ms, _, _) in real.items():
        sim_ms = step_time(model, device, [(ctx, 1, True)] * batch) * 1e3
        rows.append({"batch": batch, "real_ms": real_ms, "sim_ms": sim_ms,
                     "ratio": sim_ms / real_ms, "within_aim": abs(sim_ms / real_ms - 1) <= AIM})
    gemm = ", ".join(f"{m}: {f / 1e9:.0f}" for m, f in curve)
    print(f"SIMULATION CHECK on {machine_info()['processor']}: bandwidth {bandwidth / 1e9:.1f} "
          f"GB/s ({'weights through the GEMV' if stream else 'copy'}; copy "
          f"{limits['bandwidth_gb_s']:.1f}); {dtype} GEMM GFLOP/s at the model's shapes by rows "
          f"{{{gemm}}}; per step (inputs, sampling at "
          f"batch {min(real)}) {fixed_ms:.2f} ms; context {ctx} tokens.")
    print_table(rows,
                [("batch", "batch"), ("real_ms", "real ms", ".2f"), ("sim_ms", "sim ms", ".2f"),
                 ("ratio", "sim / real", ".2f"), ("within_aim", f"within {AIM:.0%}")])
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "sim-check", "model": kwargs["model"], "dtype": str(dtype),
                    "machine": machine_info(), "limits": limits,
                    "gemm_curve": curve, "step_overhead_ms": fixed_ms,
                    "input_len": args.input_len, "context": ctx,
                    "results": rows})
    return 0
