"""`raylm serve | chat | generate | bench ...` — one entry point, subcommands in argparse."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from raylm.config import log_level
from raylm.options import add_engine_args, engine_kwargs


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the model: one-shot with --prompt, else one turn per stdin line."""
    from raylm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
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

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
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
    logging.basicConfig(level=log_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # third-party
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
