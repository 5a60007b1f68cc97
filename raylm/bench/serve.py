"""`raylm bench serve`: online load against any OpenAI-compatible server (like `vllm bench serve`).

Sends exactly --num-prompts streaming requests of workload A (exact prompt token counts for
the --model/--tokenizer tokenizer; EOS ignored, so each request asks for its drawn output
length) at --request-rate requests/s (gamma arrivals, shape --burstiness; 1.0 is Poisson;
inf sends all at once), at most --max-concurrency in flight. Sampling is greedy
(temperature 0, as vLLM's bench does for completions) unless --temperature says otherwise.

Reports completed/failed requests, throughput, and TTFT / TPOT / ITL / E2E latency
(mean, median, percentiles, in ms); with --goodput SLOs, the rate of requests meeting all
of them. Example:
  raylm bench serve --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
      --num-prompts 200 --request-rate 4 --output-json serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from raylm.bench.queues import QueueSampler, sampling
from raylm.bench.report import machine_info, print_table, write_json
from raylm.bench.serve_client import RequestOutput, auth_headers, http_sender
from raylm.bench.serve_local import add_inprocess_args, inprocess_sender, run_alternating
from raylm.bench.serve_metrics import compute_metrics, paired_costs, per_request
from raylm.bench.traces import add_replay_args, replay_workload
from raylm.bench.workload import (BenchRequest, add_workload_args, build_workload, summarize,
                                  workload_spec)

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")]


def add_parser(sub, add_engine_args=None) -> None:
    """Register `serve` under `raylm bench`. No engine is built here, so the engine options
    (`add_engine_args`, kept for a uniform signature) are not added; only --model and --seed."""
    p = sub.add_parser("serve", help="online load against an OpenAI-compatible server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["http", "inprocess"], default="http",
                   help="http: an OpenAI-compatible server at --base-url; inprocess: the same "
                        "load through an AsyncEngine in this process (the reference for the HTTP "
                        "path's cost)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model name sent in the body; also the tokenizer unless --tokenizer is "
                        "given")
    p.add_argument("--tokenizer", default=None,
                   help="embedded model name or a local dir with the tokenizer")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrivals (1.0: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--api-key", default=None,
                   help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:10000 (ms); goodput counts requests "
                        "meeting all")
    p.add_argument("--data-parallel-rank", type=int, default=None,
                   help="send every request to this DP replica (header X-data-parallel-rank)")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--sample-queues", type=float, default=None, metavar="SECONDS",
                   help="scrape every engine's queue depth from /metrics this often (plotted by "
                        "bench plot)")
    p.add_argument("--label", default=None,
                   help="tag stored in the report (raylm bench plot groups by it)")
    p.add_argument("--output-json", default=None, help="write the results here (atomically)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--alternate-inprocess", action="store_true",
                   help="with --max-concurrency 1: send each request through an in-process engine "
                        "too, alternating, and report the paired added TTFT/TPOT of the HTTP path")
    add_workload_args(p)
    add_replay_args(p)
    add_inprocess_args(p)
    p.set_defaults(func=cmd_serve)


def parse_goodput(items: Optional[Sequence[str]]) -> Dict[str, float]:
    """['ttft:500', 'e2el:10000'] -> {'ttft': 500.0, 'e2el': 10000.0} (milliseconds)."""
    slos: Dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: expected METRIC:MS with METRIC in "
                             f"{SLO_METRICS}")
        slos[name] = float(value)
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return slos


def parse_percentiles(text: str) -> List[float]:
    """'50,90,99' -> [50.0, 90.0, 99.0], each in (0, 100]."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--percentiles {text!r}: expected comma-separated values in (0, 100]")
    return values


def arrival_intervals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """n seconds between consecutive sends: gamma(shape=burstiness, mean=1/rate), so the mean
    rate is `rate` and the variance 1/(rate^2 * burstiness) (exponential = Poisson at 1.0);
    all zeros for an infinite rate."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0 (got {rate}, {burstiness})")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time of each request relative to the start: the first at 0, then the intervals."""
    gaps = arrival_intervals(n, rate, burstiness, seed)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def tokenizer_path(args: argparse.Namespace) -> str:
    """The tokenizer dir: --tokenizer or --model, as an embedded name or a local dir."""
    from raylm.models.loader import resolve_model_path

    source = args.tokenizer or args.model
    try:
        return resolve_model_path(source)
    except ValueError:
        if os.path.isdir(source):  # a tokenizer-only dir (no weights) is fine here
            return source
        raise ValueError(f"cannot load a tokenizer from {source!r}: pass --tokenizer with an "
                         "embedded model name or a local dir holding the served model's tokenizer")


def load_requests(args: argparse.Namespace) -> Tuple[dict, List[BenchRequest], str,
                                                     Optional[np.ndarray]]:
    """(workload description, requests, tokenizer dir, send offsets: None for --request-rate):
    a trace replay, the prefix-sharing workload, or workload A with the command line's
    overrides."""
    from transformers import AutoTokenizer

    path = tokenizer_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    replay = replay_workload(args, tokenizer)
    if replay is not None:
        info, requests, offsets = replay
        return info, requests, path, offsets
    spec = workload_spec(args)
    return spec.to_dict(), build_workload(spec, tokenizer), path, None


async def run_requests(args: argparse.Namespace, requests: List[BenchRequest],
                       offsets: Optional[np.ndarray] = None,
                       sampler: Optional[QueueSampler] = None) -> Tuple[List[RequestOutput], float,
                                                                        float]:
    """Send every request on its arrival schedule (`offsets`, else --request-rate), at most
    --max-concurrency at a time; returns the outputs (in request order), the wall time from
    first send to last reply and this process's CPU seconds meanwhile (over HTTP: what the
    client took from a server on the same machine). `sampler` scrapes queue depths."""
    from tqdm import tqdm

    if offsets is None:
        offsets = send_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    sem = (asyncio.Semaphore(args.max_concurrency) if args.max_concurrency
           else contextlib.nullcontext())
    opener = inprocess_sender if args.backend == "inprocess" else http_sender
    with tqdm(total=len(requests), disable=args.disable_tqdm) as pbar:
        async with opener(args, requests) as send:
            t0, cpu0 = time.perf_counter(), time.process_time()

            async def one(i: int) -> RequestOutput:
                await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
                async with sem:
                    out = await send(i)
                out.start -= t0
                pbar.update(1)
                return out

            async with sampling(sampler, t0):
                outputs = await asyncio.gather(*(one(i) for i in range(len(requests))))
            duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return list(outputs), duration, cpu


def _jsonable_args(args: argparse.Namespace) -> dict:
    out = {k: v for k, v in vars(args).items() if not callable(v) and k != "api_key"}
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}


async def benchmark(args: argparse.Namespace) -> dict:
    """The whole run: draw the workload, send it, measure; returns the report (the JSON object)."""
    if args.alternate_inprocess and (args.backend != "http" or args.max_concurrency != 1):
        raise ValueError("--alternate-inprocess times requests one at a time both ways: it needs "
                         "--backend http and --max-concurrency 1")
    slos = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.percentiles)
    workload, requests, tok_path, offsets = load_requests(args)
    sampler = None
    if args.sample_queues and args.backend == "http":
        sampler = QueueSampler(args.base_url, auth_headers(args), args.sample_queues)
    paired, cpu = None, None
    if args.alternate_inprocess:
        outputs, reference, duration = await run_alternating(args, requests)
        paired = paired_costs(outputs, reference, percentiles)
    else:
        outputs, duration, cpu = await run_requests(args, requests, offsets, sampler)
    return {"benchmark": "serve", "label": args.label, "backend": args.backend,
            "base_url": args.base_url if args.backend == "http" else None,
            "endpoint": args.endpoint, "model": args.model, "tokenizer": tok_path,
            "args": _jsonable_args(args),
            "sampling": {"temperature": args.temperature, "ignore_eos": args.ignore_eos},
            "goodput_slos_ms": slos, "percentiles": percentiles,
            "workload": {**workload, **summarize(requests)}, "machine": machine_info(),
            "results": {**compute_metrics(outputs, duration, percentiles, slos),
                        "client_cpu_s": cpu}, "requests": per_request(outputs),
            "queue_depth": sampler.report() if sampler else None, "paired": paired}


def print_report(report: dict) -> None:
    """The summary table, then one latency row per metric (ms), then the first errors."""
    r = report["results"]
    rows = [("completed requests", r["completed"]), ("failed requests", r["failed"]),
            ("failed by status",
             ", ".join(f"{k}: {v}" for k, v in r["failed_by_status"].items()) or None),
            ("duration s", r["duration_s"]), ("total input tokens", r["total_input_tokens"]),
            ("total output tokens", r["total_output_tokens"]),
            ("requests/s", r["request_throughput"]), ("output tok/s", r["output_throughput"]),
            ("total tok/s", r["total_token_throughput"]),
            ("goodput requests/s", r["request_goodput"]), ("client CPU s", r.get("client_cpu_s"))]
    print()
    print_table([{"metric": k, "value": v} for k, v in rows], ["metric", "value"])
    stats = ["mean", "median"] + [f"p{p:g}" for p in report["percentiles"]]
    print()
    print_table([{"metric": label + " ms", **{s: r[f"{s}_{name}_ms"] for s in stats}}
                 for name, label in LATENCY_METRICS], ["metric"] + [(s, s, ".2f") for s in stats])
    if report.get("paired"):
        p = report["paired"]
        ttft, tpot = p["added_ttft_ms"], p["added_tpot_ms"]
        print(f"\nadded by the HTTP path (paired with in-process runs, {p['pairs']} requests): "
              f"TTFT median {ttft['median']:.2f} ms, mean {ttft['mean']:.2f}; TPOT median "
              f"{tpot['median']:.2f} ms (in-process TTFT median "
              f"{p['reference_ttft_ms']['median']:.2f})")
    errors = Counter(e for e in report["requests"]["errors"] if e)
    for error, count in errors.most_common(3):
        print(f"error x{count}: {error[:200]}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write JSON; exit status 1 if nothing completed."""
    report = asyncio.run(benchmark(args))
    print_report(report)
    if args.output_json:
        write_json(args.output_json, report)
        print(f"wrote {args.output_json}")
    return 0 if report["results"]["completed"] else 1
