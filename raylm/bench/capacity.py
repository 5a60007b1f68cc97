"""`raylm bench sim-capacity`: the request rate a simulated fleet sustains on a workload, and
the rate (or trace time scale) that loads it to a given fraction.

Capacity is the roofline estimate (raylm.executor.roofline.fleet_capacity): engines over the
mean device time a request costs (its prefill, plus its share of decode steps at
--max-num-seqs sequences), with no prefix-cache hits. Same workload options as `raylm
bench serve`, so the two draw the same requests:
  raylm bench sim-capacity --sim-device h100 --sim-model llama-3-8b --engines 64 \\
      --max-num-seqs 8 --load 0.8 --trace ../shared/traces/azure_llm_2023_conv.csv --num-prompts 600
"""
from __future__ import annotations

import argparse
import json

from raylm.bench.traces import add_replay_args
from raylm.bench.workload import add_workload_args


def add_parser(sub) -> None:
    p = sub.add_parser("sim-capacity", help="a simulated fleet's capacity on a workload (roofline estimate)")
    p.add_argument("--sim-device", default="h100")
    p.add_argument("--sim-model", default="llama-3-8b")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=128, help="sequences an engine decodes at once")
    p.add_argument("--load", type=float, default=0.8, help="fraction of capacity to size the rate for")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served model (its tokenizer)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    add_workload_args(p)
    add_replay_args(p)
    p.set_defaults(func=cmd_sim_capacity)


def capacity(args: argparse.Namespace) -> dict:
    from raylm.bench.serve import load_requests
    from raylm.executor.roofline import fleet_capacity
    from raylm.executor.sim import model_shape, parse_device

    workload, requests, _, offsets = load_requests(args)
    lengths = [(len(r.prompt_token_ids), r.output_len) for r in requests]
    model, device = model_shape(args.sim_model, None), parse_device(args.sim_device)
    cap = fleet_capacity(model, device, lengths, args.max_num_seqs, args.engines)
    out = {"simulated": f"{model.name} on {device.name}", "engines": args.engines,
           "max_num_seqs": args.max_num_seqs, "capacity_req_s": cap, "load": args.load,
           "request_rate": args.load * cap, "mean_prompt": sum(p for p, _ in lengths) / len(lengths),
           "mean_output": sum(o for _, o in lengths) / len(lengths)}
    if workload.get("trace"):  # the time scale that replays the trace at that rate
        native = len(requests) / max(1e-9, float(offsets[-1]) * workload["time_scale"])
        out.update(trace_rate_req_s=native, trace_time_scale=args.load * cap / native)
    return out


def cmd_sim_capacity(args: argparse.Namespace) -> int:
    out = capacity(args)
    for k, v in out.items():
        print(f"{k:18} {v:.4g}" if isinstance(v, float) else f"{k:18} {v}")
    print(json.dumps(out))
    return 0
