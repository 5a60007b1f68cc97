"""`raylm bench sim-check`: the simulated executor's step times against the real executor's,
on this machine, for one model at several decode batch sizes.

The simulator is given this machine as a device: its limits measured here (a large copy's
bytes/s and a GEMM's FLOP/s, as `raylm bench kernels` measures them) and its fixed costs,
measured on the same model cut to 1 and 2 decoder layers (batch-1 decode steps: the part of
their time the roofline does not explain is a per-step cost plus a per-layer one). Then for
each batch size the full model's real decode steps are timed (the executor's part: inputs,
forward, logits, sampling) and compared with the roofline time the simulator would sleep for
the same batch. Prints a table (ratio sim / real) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Dict, Tuple

from raylm.bench.report import machine_info, print_table, write_json

AIM = 0.30  # the bound on |sim / real - 1|


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("sim-check", help="the simulated executor's step times against real ones, here")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_sim_check)


def truncated_copy(model_dir: str, layers: int, into: str) -> str:
    """`model_dir` with only its first `layers` decoder layers (config edited, files linked;
    the loader skips the other layers' weights)."""
    out = os.path.join(into, f"layers{layers}")
    os.makedirs(out)
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(model_dir, name), os.path.join(out, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": layers}, f)
    return out


def executor_ms(kwargs: Dict, batch: int, input_len: int, steps: int) -> Tuple[float, object]:
    """Median ms of the executor's part of a decode step at `batch`; and the weights' dtype."""
    from raylm import LLM
    from raylm.bench.step import _fill, time_steps

    llm = LLM(**{**kwargs, "max_model_len": input_len + steps + 64})
    _fill(llm, batch, input_len, steps + 10, 1.0, 0)
    med = time_steps(llm, steps)
    dtype = next(llm.engine.core.executor.worker.runner.model.parameters()).dtype
    llm.engine.core.shutdown()
    return med["total"] - med["schedule"] - med["update"], dtype


def cmd_sim_check(args: argparse.Namespace) -> int:
    import torch

    from raylm.bench.kernels import measure_limits
    from raylm.executor.roofline import DeviceProfile, ModelShape, step_time
    from raylm.models.loader import load_hf_config, resolve_model_path
    from raylm.options import engine_kwargs

    kwargs = engine_kwargs(args)
    path = resolve_model_path(kwargs["model"])
    ctx = args.input_len + 5 + args.steps // 2  # the median step's context (5 warm-up steps)
    rows, tmp = [], tempfile.mkdtemp(prefix="raylm-simcheck-")
    try:
        small = {n: executor_ms({**kwargs, "model": truncated_copy(path, n, tmp)}, 1, args.input_len, args.steps)
                 for n in (1, 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dtype = small[1][1]
    with torch.inference_mode():
        limits = measure_limits(torch.device("cpu"), dtype, repeats=5)
    bare = DeviceProfile("this CPU", limits["bandwidth_gb_s"] * 1e9, limits["gemm_tflop_s"] * 1e12, 0)
    full = ModelShape.from_hf_config(load_hf_config(path), dtype_bytes=dtype.itemsize)
    cut = {n: ModelShape(**{**full.__dict__, "num_layers": n}) for n in (1, 2)}
    unexplained = {n: small[n][0] / 1e3 - step_time(cut[n], bare, [(ctx, 1, True)]) for n in (1, 2)}
    per_layer = max(0.0, unexplained[2] - unexplained[1])
    per_step = max(0.0, unexplained[1] - per_layer)
    device = DeviceProfile("this CPU (measured)", bare.mem_bandwidth, bare.flops, 0, per_step, per_layer)
    for batch in args.batch_size:
        real_ms, _ = executor_ms(kwargs, batch, args.input_len, args.steps)
        sim_ms = step_time(full, device, [(ctx, 1, True)] * batch) * 1e3
        rows.append({"batch": batch, "real_ms": real_ms, "sim_ms": sim_ms, "ratio": sim_ms / real_ms,
                     "within_aim": abs(sim_ms / real_ms - 1) <= AIM})
    print(f"SIMULATION CHECK on {machine_info()['processor']}: copy {limits['bandwidth_gb_s']:.1f} GB/s, "
          f"{dtype} GEMM {limits['gemm_tflop_s']:.2f} TFLOP/s; fixed costs from 1- and 2-layer cuts: "
          f"{per_step * 1e3:.2f} ms per step, {per_layer * 1e6:.0f} us per layer (ctx {ctx}).")
    print_table(rows, [("batch", "batch"), ("real_ms", "real ms", ".2f"), ("sim_ms", "sim ms", ".2f"),
                       ("ratio", "sim / real", ".2f"), ("within_aim", f"within {AIM:.0%}")])
    if args.output_json:
        write_json(args.output_json, {"benchmark": "sim-check", "model": kwargs["model"], "dtype": str(dtype),
                                      "machine": machine_info(), "limits": limits, "input_len": args.input_len,
                                      "step_overhead_ms": per_step * 1e3, "layer_overhead_us": per_layer * 1e6,
                                      "results": rows})
    return 0
