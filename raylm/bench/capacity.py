"""`raylm bench sim-capacity`: the request rate a simulated fleet sustains on a workload, and
the rate (or trace time scale) that loads it to a given fraction.

Capacity is measured on the simulator: one engine (--max-num-seqs, --num-blocks, prefix
caching off, so no request is cheaper than its prompt says) runs every request of the
workload at once, at CPU speed, on the simulated clock; its requests per simulated second,
times --engines, is the fleet's. The roofline estimate (raylm.executor.roofline.
fleet_capacity: engines over the mean device time of a request alone, prefill plus its
share of decode steps) is printed beside it: it leaves out that prefill chunks ride in
decode steps whose weight reads they share, so it comes out low. Same workload options as
`raylm bench serve`, so the two draw the same requests:
  raylm bench sim-capacity --sim-device h100 --sim-model llama-3-8b --engines 64 \\
      --max-num-seqs 8 --load 0.8 --num-prompts 600 \\
      --trace ../shared/traces/azure_llm_2023_conv.csv
"""
from __future__ import annotations

import argparse
import json

from raylm.bench.traces import add_replay_args
from raylm.bench.workload import add_workload_args


def add_parser(sub) -> None:
    p = sub.add_parser("sim-capacity",
                       help="a simulated fleet's capacity on a workload (roofline estimate)")
    p.add_argument("--sim-device", default="h100")
    p.add_argument("--sim-model", default="llama-3-8b")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="sequences an engine decodes at once")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per engine (default: the device's)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--load", type=float, default=0.8,
                   help="fraction of capacity to size the rate for")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="the served model (its tokenizer)")
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

    workload, requests, tok_path, offsets = load_requests(args)
    lengths = [(len(r.prompt_token_ids), r.output_len) for r in requests]
    model, device = model_shape(args.sim_model, None), parse_device(args.sim_device)
    cap = args.engines * engine_capacity(args, tok_path, requests)
    out = {"simulated": f"{model.name} on {device.name}", "engines": args.engines,
           "max_num_seqs": args.max_num_seqs, "capacity_req_s": cap, "load": args.load,
           "roofline_capacity_req_s": fleet_capacity(model, device, lengths, args.max_num_seqs,
                                                     args.engines),
           "request_rate": args.load * cap,
           "mean_prompt": sum(p for p, _ in lengths) / len(lengths),
           "mean_output": sum(o for _, o in lengths) / len(lengths)}
    if workload.get("trace"):  # the time scale that replays the trace at that rate
        native = len(requests) / max(1e-9, float(offsets[-1]) * workload["time_scale"])
        out.update(trace_rate_req_s=native, trace_time_scale=args.load * cap / native)
    return out


def engine_capacity(args: argparse.Namespace, model_path: str, requests) -> float:
    """Requests per simulated second of one engine given every request at once."""
    from raylm import LLM, SamplingParams

    llm = LLM(model_path, executor="sim", sim_device=args.sim_device, sim_model=args.sim_model,
              max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
              max_model_len=args.max_model_len, enable_prefix_caching=False)
    executor = llm.engine.core.executor
    executor.defer_device_time()  # nobody waits it out: the simulated clock is the measure
    executor.simulated_s = 0.0  # from here: not the warm-up's
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in requests],
                 use_tqdm=False)
    llm.shutdown()
    return len(requests) / executor.simulated_s


def cmd_sim_capacity(args: argparse.Namespace) -> int:
    out = capacity(args)
    for k, v in out.items():
        print(f"{k:18} {v:.4g}" if isinstance(v, float) else f"{k:18} {v}")
    print(json.dumps(out))
    return 0
