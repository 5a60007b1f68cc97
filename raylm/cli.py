"""`raylm serve | chat | generate | bench ...` — one entry point, subcommands in argparse."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from raylm.config import log_level


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by every subcommand that builds an engine (vLLM's spellings)."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or local HF dir")
    parser.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default=None,
                        help="KV cache budget: bytes ('2GiB') or a fraction of free memory (0.3)")
    parser.add_argument("--kv-cache-dtype", default=None, help="auto (model dtype) | float32 | bfloat16")
    parser.add_argument("--num-blocks", type=int, default=None, help="fix the KV cache size in blocks")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int, default=1)
    parser.add_argument("--worker-num-cpus", type=float, default=None, help="CPUs per TP/PP worker actor")
    parser.add_argument("--enable-expert-parallel", action="store_true", default=None,
                        help="MoE: whole experts spread over the EP ranks (the TP ranks; with "
                             "raylm serve --dp > 1, every replica's, in lockstep) instead of a slice of each")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where the model runs: auto (default) is CUDA when a GPU is visible, else CPU")
    parser.add_argument("--attention-backend", default=None,
                        help="paged attention: auto (default; per device) | torch (reference) | cpu (C kernel)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="CUDA: fraction of GPU memory for weights, activations and KV cache (0.9)")
    parser.add_argument("--cpu-communicator", choices=["shm", "gloo"], default=None,
                        help="TP collectives on CPU: shared memory on one host (default) or gloo")


def engine_kwargs(args: argparse.Namespace) -> dict:
    keys = ["dtype", "max_model_len", "kv_cache_memory", "block_size", "max_num_seqs",
            "max_num_batched_tokens", "enable_prefix_caching", "seed", "num_blocks", "kv_cache_dtype",
            "tensor_parallel_size", "pipeline_parallel_size", "worker_num_cpus", "cpu_communicator", "enable_expert_parallel",
            "device", "attention_backend", "gpu_memory_utilization"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the model: one-shot with --prompt, else one turn per stdin line."""
    from raylm import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    history: List[dict] = []
    prompts = [args.prompt] if args.prompt else _stdin_lines()
    for text in prompts:
        history.append({"role": "user", "content": text})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", flush=True)
    return 0


def _stdin_lines():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("user: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def cmd_generate(args: argparse.Namespace) -> int:
    from raylm import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.generate(args.prompts, params):
        print(out.prompt + out.outputs[0].text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model in this process")
    add_engine_args(chat)
    chat.add_argument("--prompt", default=None, help="one message, then exit")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", help="complete prompts in this process")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)
    from raylm.bench.cli import add_bench_parser
    from raylm.serve.launcher import add_serve_parser

    add_serve_parser(sub, add_engine_args)
    add_bench_parser(sub, add_engine_args)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # third-party
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
