"""`raylm bench structured`: what grammar masks cost. The same chat requests, all arriving at
once (one batch of --num-prompts), run with 0, half and all of them constrained by a JSON
schema (xgrammar); per fraction: output tok/s, the median step, and per step the bitmask
filling (engine side, every constrained request that samples) and applying (worker side,
on the logits), medians over the decode steps that ran the whole batch. Sampling:
temperature 1, EOS ignored; a constrained request ends when its JSON is complete.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

from raylm.bench.report import machine_info, print_table, write_json

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "city", "notes"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"type": "string"},
                         "notes": {"type": "array", "items": {"type": "string"}}}}
TOPICS = ["a doctor", "a pilot", "a chef", "a child", "an author", "a farmer", "a sailor",
          "a judge"]
COLUMNS = [("fraction", "structured"), ("requests", "requests"),
           ("output_tokens", "output tokens"), ("output_tok_s", "output tok/s", ".1f"),
           ("full_steps", "full steps"), ("step_ms", "step ms", ".2f"),
           ("fill_ms", "mask fill ms", ".3f"), ("apply_ms", "mask apply ms", ".3f")]


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("structured",
                       help="grammar mask cost per step and throughput with structured requests",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=32,
                   help="the batch: every request arrives at once")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_structured)


def _run(llm, prompts: List[List[int]], fraction: float, max_tokens: int) -> Dict:
    from raylm import SamplingParams
    from raylm.sampling_params import StructuredOutputsParams

    engine, n = llm.engine, round(len(prompts) * fraction)
    for i, ids in enumerate(prompts):
        constraint = StructuredOutputsParams(json=SCHEMA) if i < n else None
        engine.add_request({"prompt_token_ids": ids}, SamplingParams(
            temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True,
            structured_outputs=constraint))
    steps, tokens, start = [], 0, time.perf_counter()
    while engine.has_unfinished_requests():
        full = (engine.core.scheduler.num_running == len(prompts)
                and not engine.core.scheduler.waiting)
        t0 = time.perf_counter()
        outs = engine.step()
        if full:
            steps.append((time.perf_counter() - t0, engine.core.scheduler.last_grammar_s,
                          engine.core.last_step_times.get("grammar", 0.0)))
        tokens += sum(len(c.token_ids) for o in outs if o.finished for c in o.outputs)
    elapsed = time.perf_counter() - start
    med = [statistics.median(s[k] for s in steps) * 1e3 if steps else 0.0 for k in range(3)]
    return {"fraction": fraction, "requests": len(prompts), "output_tokens": tokens,
            "elapsed_s": elapsed, "output_tok_s": tokens / elapsed, "full_steps": len(steps),
            "step_ms": med[0], "fill_ms": med[1], "apply_ms": med[2]}


def cmd_structured(args: argparse.Namespace) -> int:
    from raylm import LLM, SamplingParams
    from raylm.options import engine_kwargs

    llm = LLM(**engine_kwargs(args))
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user",
                                         "content": f"Describe {TOPICS[i % len(TOPICS)]} "
                                                    f"number {i} as JSON."}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
               for i in range(args.num_prompts)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    # compiled before timing
    llm.engine.compile_grammar(SamplingParams(structured_outputs=_constraint()))
    rows = [_run(llm, prompts, f, args.max_tokens) for f in args.fractions]
    print_table(rows, COLUMNS)
    base = rows[0]["output_tok_s"] if rows and rows[0]["fraction"] == 0 else None
    for r in rows[1:] if base else []:
        print(f"structured {r['fraction']:.0%}: {r['output_tok_s'] / base:.2f}x the unconstrained "
              "throughput")
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "structured", "model": args.model, "schema": SCHEMA,
                    "max_tokens": args.max_tokens, "machine": machine_info(),
                    "results": rows})
    return 0


def _constraint():
    from raylm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=SCHEMA)
