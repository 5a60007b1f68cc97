"""`raylm bench throughput`: offline throughput of raylm vs HF transformers on workload A.

Both backends run the same weights (the resolved local HF dir) on the same requests with
EOS ignored, so every request produces exactly its drawn output length. Only generation is
timed (model load and a short warm-up are not). Sampling: temperature 1.0, top_p 1.0.
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import List

from raylm.bench.report import machine_info, plot_bars, print_table, write_json
from raylm.bench.workload import (BenchRequest, add_workload_args, build_workload, summarize,
                                  warmup_requests, workload_spec)

COLUMNS = [("backend", "backend"), ("requests", "requests"), ("prompt_tokens", "prompt tokens"),
           ("output_tokens", "output tokens"), ("elapsed_s", "elapsed s", ".2f"),
           ("requests_per_s", "requests/s", ".3f"), ("output_tok_s", "output tok/s", ".1f"),
           ("total_tok_s", "total tok/s", ".1f")]


def add_parser(sub, add_engine_args) -> None:
    """Register `throughput` under `raylm bench`, with the engine options and workload A's
    knobs."""
    p = sub.add_parser("throughput", help="offline throughput: raylm vs HF transformers generate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--backend", choices=["raylm", "hf", "both"], default="both")
    p.add_argument("--output-json", default=None, help="write the results here (atomically)")
    p.add_argument("--hf-batch-size", type=int, default=32,
                   help="static batch size of the HF backend")
    p.add_argument("--plot", default=None,
                   help="bar chart of output tok/s to this PNG (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true")
    add_workload_args(p)
    p.set_defaults(func=cmd_throughput)


def dtype_name(dtype: str) -> str:
    """The torch dtype name a --dtype value means here ('bf16' -> 'bfloat16'; auto: what raylm
    picks for this CPU's weights), so the HF reference runs in raylm's dtype."""
    from raylm.config import ModelConfig
    from raylm.kernels.machine import auto_cpu_weights_dtype

    name = ModelConfig(dtype=dtype).dtype
    return auto_cpu_weights_dtype() if name == "auto" else name


def figures(requests: List[BenchRequest], output_lens: List[int], elapsed: float) -> dict:
    """Requests, token totals and rates for one backend's run over `requests`."""
    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(output_lens)
    return {"requests": len(requests), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed, "output_tok_s": output_tokens / elapsed,
            "total_tok_s": (prompt_tokens + output_tokens) / elapsed}


def run_raylm(args: argparse.Namespace, requests: List[BenchRequest]) -> dict:
    """Build the engine, warm up, time one `LLM.generate` over every request."""
    from raylm import LLM, SamplingParams
    from raylm.options import engine_kwargs

    llm = LLM(**engine_kwargs(args))
    limit = llm.engine.max_model_len
    longest = max(r.prompt_len + r.output_len for r in requests)
    if longest > limit:
        raise ValueError(f"a request needs {longest} tokens but max_model_len is {limit}")
    warm = warmup_requests(requests)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                 SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=r.output_len)
              for r in requests]
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    lens = [len(o.outputs[0].token_ids) for o in outs]
    result = figures(requests, lens, elapsed)
    # the engine's CPU (every thread, spin-waits included): the served engines' is comparable
    result["cpu_s"] = cpu
    result["length_mismatches"] = sum(n != r.output_len for n, r in zip(lens, requests))
    result["model_path"] = llm.engine.model_path
    del llm, outs
    gc.collect()
    return result


def run_hf_backend(args: argparse.Namespace, requests: List[BenchRequest], path: str) -> dict:
    """HF transformers static batching on the same weights and requests."""
    from raylm.bench.hf_backend import run_hf

    raw = run_hf(path, requests, dtype_name(args.dtype), args.hf_batch_size, args.seed,
                 use_tqdm=not args.disable_tqdm)
    result = figures(requests, raw.pop("output_lens"), raw.pop("elapsed_s"))
    result.update(raw)
    return result


def run_benchmark(args: argparse.Namespace) -> dict:
    """Draw the workload, run the chosen backends, return the report (the JSON object)."""
    from transformers import AutoTokenizer

    from raylm.models.loader import resolve_model_path

    path = resolve_model_path(args.model)
    spec = workload_spec(args)
    requests = build_workload(spec, AutoTokenizer.from_pretrained(path))
    results = {}
    if args.backend in ("raylm", "both"):
        results["raylm"] = run_raylm(args, requests)
    if args.backend in ("hf", "both"):
        results["hf"] = run_hf_backend(args, requests, path)
    ratio = None
    if "raylm" in results and "hf" in results:
        ratio = results["raylm"]["output_tok_s"] / results["hf"]["output_tok_s"]
    return {"benchmark": "throughput", "workload": {**spec.to_dict(), **summarize(requests)},
            "model": args.model, "model_path": path, "dtype": dtype_name(args.dtype),
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "ignore_eos": True},
            "hf_batch_size": args.hf_batch_size, "machine": machine_info(),
            "results": results, "ratio_output_tok_s": ratio}


def cmd_throughput(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table (and the raylm/hf ratio), write JSON and plot."""
    report = run_benchmark(args)
    results = report["results"]
    print()
    print_table([{"backend": name, **r} for name, r in results.items()], COLUMNS)
    for name, r in results.items():
        if r.get("length_mismatches"):
            print(f"WARNING: {name}: {r['length_mismatches']} requests did not produce their "
                  "output length")
    if report["ratio_output_tok_s"] is not None:
        print(f"\nraylm / hf output tok/s: {report['ratio_output_tok_s']:.2f}x")
    if args.output_json:
        write_json(args.output_json, report)
        print(f"wrote {args.output_json}")
    if args.plot:
        title = (f"{report['model']} ({report['dtype']}, {report['workload']['num_requests']} "
                 "requests)")
        plot_bars(args.plot, list(results), [r["output_tok_s"] for r in results.values()],
                  "output tok/s", title)
    return 0
