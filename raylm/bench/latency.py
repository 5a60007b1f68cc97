"""`raylm bench latency`: one request at a time, offline (vLLM's `bench latency` shape).

Reports time to first token (prefill + first sample), per-output-token decode latency and
end-to-end latency, medians over `--iters` runs after `--warmup` runs. The prompt is random
token ids of `--input-len`; EOS is ignored so every run decodes `--output-len` tokens.
It is the offline reference for the TTFT the HTTP path adds (compare `raylm bench serve
--max-concurrency 1`).
"""
from __future__ import annotations

import argparse
import statistics
import time

from raylm.bench.report import dtype_info, machine_info, print_table, write_json


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("latency", help="single-request TTFT / per-token / end-to-end latency")
    add_engine_args(p)
    p.add_argument("--input-len", type=int, default=150)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_latency)


def one_request(llm, prompt_ids, output_len: int) -> dict:
    """Drive the engine step by step for one request; times its first and last token."""
    from raylm import SamplingParams

    start = time.perf_counter()
    llm.engine.add_request({"prompt_token_ids": prompt_ids},
                           SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    first, decode = None, []
    while llm.engine.has_unfinished_requests():
        outputs = llm.engine.step()
        if first is not None:
            decode.append(dict(llm.engine.core.last_step_times))
        for out in outputs:
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_ms": (first - start) * 1000, "e2e_ms": (end - start) * 1000,
            "tpot_ms": (end - first) * 1000 / max(1, output_len - 1), **_decode_phases(decode)}


def _decode_phases(steps) -> dict:
    """Median per decode step, as the answering worker saw it: its whole step and the part
    spent in collectives / stage transfers (with TP/PP; 0 otherwise)."""
    steps = [s for s in steps if s]
    if not steps:
        return {"step_ms": None, "comm_ms": None}
    return {"step_ms": statistics.median(sum(v for k, v in s.items() if k != "comm")
                                         for s in steps) * 1000,
            "comm_ms": statistics.median(s.get("comm", 0.0) for s in steps) * 1000}


def cmd_latency(args: argparse.Namespace) -> int:
    import torch

    from raylm import LLM
    from raylm.options import engine_kwargs

    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", args.input_len + args.output_len + 16)
    llm = LLM(**kwargs)
    gen = torch.Generator().manual_seed(args.seed)
    runs = []
    for i in range(args.warmup + args.iters):
        ids = torch.randint(10, llm.engine.vocab_size, (args.input_len,), generator=gen).tolist()
        result = one_request(llm, ids, args.output_len)
        if i >= args.warmup:
            runs.append(result)
    keys = ("ttft_ms", "tpot_ms", "e2e_ms", "step_ms", "comm_ms")
    row = {"input_len": args.input_len, "output_len": args.output_len,
           "tp": args.tensor_parallel_size, "pp": args.pipeline_parallel_size,
           **{k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None
              for k in keys}}
    row["comm_share"] = row["comm_ms"] / row["step_ms"] if row["step_ms"] else None
    print_table([row],
                [("tp", "TP"), ("pp", "PP"), ("input_len", "input"), ("output_len", "output"),
                 ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
                 ("e2e_ms", "E2E ms", ".0f"), ("step_ms", "worker step ms", ".2f"),
                 ("comm_ms", "comm ms", ".2f"), ("comm_share", "comm share", ".2f")])
    llm.shutdown()
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "latency", "model": args.model, "dtype": args.dtype,
                    **dtype_info(llm), "iters": args.iters, "machine": machine_info(),
                    "median": row, "runs": runs})
    return 0
