"""Request traces and the prefix-sharing workload for `raylm bench serve`.

Traces: CSV files of real requests (`TIMESTAMP, ContextTokens, GeneratedTokens`), such as
the Azure LLM inference traces in ../shared/traces/ (Azure Public Dataset, "Azure LLM
inference trace 2023", CC-BY 4.0; Patel et al., "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024). A replay keeps each request's arrival time
(divided by a time scale: 2.0 replays twice as fast), prompt length and output length; the
prompt text is made of random single-token words (the trace has none: privacy).

Prefix sharing: `num_prefixes` long system prompts, each request one of them (at random)
plus a short question of its own, the shape that prefix-cache-aware routing is for.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from typing import List, Optional, Sequence

import numpy as np

from raylm.bench.workload import BenchRequest, random_request, sample_lengths, single_token_words


@dataclass
class TraceRow:
    offset_s: float  # since the first request of the slice
    prompt_len: int
    output_len: int


def load_trace(path: str, start: int = 0, limit: Optional[int] = None) -> List[TraceRow]:
    """Rows `start` .. `start + limit` of a trace CSV, offsets relative to the first of them."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[start:None if limit is None else start + limit]
    if not rows:
        raise ValueError(f"trace {path} has no rows from {start}")
    try:
        times = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
        lengths = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"trace {path} must have columns TIMESTAMP, ContextTokens, "
                         f"GeneratedTokens ({exc})") from None
    t0 = times[0]
    return [TraceRow((t - t0).total_seconds(), max(1, p), max(1, o))
            for t, (p, o) in zip(times, lengths)]


def trace_requests(rows: Sequence[TraceRow], tokenizer, seed: int = 0,
                   max_prompt: Optional[int] = None,
                   max_output: Optional[int] = None) -> List[BenchRequest]:
    """A request per row, its lengths clipped to `max_prompt` / `max_output` if given."""
    rng, words = np.random.default_rng(seed), single_token_words(tokenizer)
    out = []
    for row in rows:
        n_in = min(row.prompt_len, max_prompt or row.prompt_len)
        out.append(random_request(rng, words, n_in,
                                  min(row.output_len, max_output or row.output_len)))
    return out


def trace_offsets(rows: Sequence[TraceRow], time_scale: float = 1.0) -> np.ndarray:
    """Send times in seconds: the trace's, divided by `time_scale` (> 1 replays faster)."""
    if time_scale <= 0:
        raise ValueError(f"trace time scale must be > 0 (got {time_scale})")
    return np.array([r.offset_s for r in rows]) / time_scale


def prefix_sharing_requests(n: int, tokenizer, num_prefixes: int = 4, prefix_len: int = 1024,
                            suffix_len: int = 32, output_median: float = 100.0,
                            seed: int = 0) -> List[BenchRequest]:
    """`n` requests: one of `num_prefixes` shared prompts of `prefix_len` tokens, then
    `suffix_len` tokens of their own; lognormal output lengths (median `output_median`)."""
    if min(n, num_prefixes, prefix_len) < 1 or suffix_len < 0:
        raise ValueError("prefix workload needs n, num_prefixes, prefix_len >= 1 and suffix_len "
                         ">= 0")
    rng, words = np.random.default_rng(seed), single_token_words(tokenizer)
    prefixes = [random_request(rng, words, prefix_len, 1) for _ in range(num_prefixes)]
    outs = sample_lengths(rng, n, output_median, 0.8, 8, 4 * int(output_median))
    requests = []
    for i in range(n):
        shared, own = (prefixes[int(rng.integers(num_prefixes))],
                       random_request(rng, words, suffix_len, 1))
        requests.append(BenchRequest(shared.prompt_token_ids + own.prompt_token_ids,
                                     shared.prompt + own.prompt, int(outs[i])))
    return requests



def add_replay_args(parser) -> None:
    """--trace (replay a trace file) and --prefix-sharing (the shared-prompt workload)."""
    g = parser.add_argument_group("trace replay and prefix sharing (instead of workload A)")
    g.add_argument("--trace", default=None,
                   help="replay this trace CSV (e.g. the Azure conversation trace)")
    g.add_argument("--trace-start", type=int, default=0, help="first trace row to replay")
    g.add_argument("--trace-time-scale", type=float, default=1.0,
                   help="replay speed-up (2: twice as fast)")
    g.add_argument("--max-prompt-len", type=int, default=None,
                   help="clip the trace's prompt lengths")
    g.add_argument("--max-output-len", type=int, default=None,
                   help="clip the trace's output lengths")
    g.add_argument("--prefix-sharing", action="store_true",
                   help="requests share --num-prefixes long prompts")
    g.add_argument("--num-prefixes", type=int, default=4)
    g.add_argument("--prefix-len", type=int, default=1024)
    g.add_argument("--suffix-len", type=int, default=32)


def replay_workload(args, tokenizer):
    """(workload description, requests, send offsets or None for --request-rate) for
    --trace or --prefix-sharing; None when neither is asked for."""
    if args.trace and args.prefix_sharing:
        raise ValueError("--trace and --prefix-sharing are separate workloads: pick one")
    if args.trace:
        rows = load_trace(args.trace, args.trace_start, args.num_prompts)
        reqs = trace_requests(rows, tokenizer, args.seed, args.max_prompt_len, args.max_output_len)
        info = {"trace": args.trace, "trace_start": args.trace_start,
                "time_scale": args.trace_time_scale, "trace_span_s": rows[-1].offset_s,
                "attribution": ATTRIBUTION}
        return info, reqs, trace_offsets(rows, args.trace_time_scale)
    if args.prefix_sharing:
        reqs = prefix_sharing_requests(args.num_prompts, tokenizer, args.num_prefixes,
                                       args.prefix_len, args.suffix_len, args.output_median,
                                       args.seed)
        info = {"prefix_sharing": True, "num_prefixes": args.num_prefixes,
                "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
                "output_median": args.output_median}
        return info, reqs, None
    return None


ATTRIBUTION = ("Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY 4.0); Patel et al., "
               "\"Splitwise: Efficient generative LLM inference using phase splitting\", ISCA "
               "2024")
