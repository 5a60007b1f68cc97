"""`raylm bench step`: where a decode step's time goes at a fixed batch size and context.

Fills the engine with `--batch-size` requests of `--input-len` random tokens, prefills
them, then times decode steps phase by phase: schedule, input preparation, forward,
logits, sampling, state update. Python-side overhead = schedule + prepare + sample +
update (the issue's definition). Prints a table of medians and writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

from raylm.bench.report import dtype_info, machine_info, print_table, write_json

PHASES = ["schedule", "prepare", "forward", "logits", "sample", "update"]
OVERHEAD = ["schedule", "prepare", "sample", "update"]


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("step", help="decode-step time breakdown at a fixed batch size")
    add_engine_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[32])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=40,
                   help="timed decode steps (after 5 warm-up steps)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_step)


def _fill(llm, batch: int, input_len: int, max_tokens: int, temperature: float, seed: int) -> None:
    import torch

    from raylm import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
    vocab = llm.engine.vocab_size
    for _ in range(batch):
        ids = torch.randint(10, vocab, (input_len,), generator=gen).tolist()
        llm.engine.add_request({"prompt_token_ids": ids}, params)
    core = llm.engine.core
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in core.scheduler.requests.values()):
        llm.engine.step()


def time_steps(llm, steps: int) -> Dict[str, float]:
    """Median milliseconds per phase over `steps` decode steps (after 5 warm-up steps)."""
    core = llm.engine.core
    runner = core.executor.worker.runner
    samples: Dict[str, List[float]] = {k: [] for k in PHASES + ["total"]}
    for i in range(steps + 5):
        t0 = time.perf_counter()
        sched = core.scheduler.schedule()
        t1 = time.perf_counter()
        out = core.executor.execute_model(sched)
        t2 = time.perf_counter()
        core.scheduler.update_from_output(sched, out)
        t3 = time.perf_counter()
        if i < 5:
            continue
        phase = dict(runner.last_step_times, schedule=t1 - t0, update=t3 - t2, total=t3 - t0)
        for k in samples:
            samples[k].append(phase.get(k, 0.0) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def cmd_step(args: argparse.Namespace) -> int:
    from raylm import LLM
    from raylm.options import engine_kwargs

    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", args.input_len + args.steps + 64)
    llm = LLM(**kwargs)
    rows = []
    for batch in args.batch_size:
        _fill(llm, batch, args.input_len, args.steps + 10, args.temperature, args.seed)
        med = time_steps(llm, args.steps)
        for req_id in list(llm.engine.processor.parents):
            llm.engine.abort_request(req_id)
        overhead = sum(med[k] for k in OVERHEAD)
        rows.append({"batch": batch, **{f"{k}_ms": med[k] for k in PHASES},
                     "step_ms": med["total"], "python_overhead_pct": 100 * overhead / med["total"],
                     "decode_tok_s": batch / med["total"] * 1000})
    cols = [("batch", "batch")] + [(f"{k}_ms", k, ".2f") for k in PHASES] + [
        ("step_ms", "step ms", ".1f"), ("python_overhead_pct", "py overhead %", ".1f"),
        ("decode_tok_s", "decode tok/s", ".0f")]
    print_table(rows, cols)
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "step", "model": args.model, "dtype": args.dtype,
                    **dtype_info(llm), "input_len": args.input_len, "steps": args.steps,
                    "machine": machine_info(), "results": rows})
    return 0
