"""`raylm bench serve --backend inprocess`: the same load, timed the same way, but sent
straight to an AsyncEngine in this process (no HTTP, no Serve, no Ray).

This is the reference for what the HTTP path costs: same prompts, same arrival schedule,
same concurrency cap, and a "chunk" is what the HTTP client would have received (an
update that carries new text), timed when the engine hands it over.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, List, Tuple

from raylm.bench.serve_client import RequestOutput, http_sender
from raylm.bench.workload import BenchRequest

Sender = Callable[[int], Awaitable[RequestOutput]]


def add_inprocess_args(p: argparse.ArgumentParser) -> None:
    """The engine options, for --backend inprocess (--model, --seed and --tokenizer are the
    benchmark's own, with the same meaning)."""
    from raylm.options import add_engine_args

    add_engine_args(p, skip={"model", "seed", "tokenizer"})


@contextlib.asynccontextmanager
async def inprocess_sender(args: argparse.Namespace,
                           requests: List[BenchRequest]) -> AsyncIterator[Sender]:
    """Yields send(i): run request i through a fresh in-process AsyncEngine (warmed up)."""
    from raylm.engine.async_engine import AsyncEngine
    from raylm.llm import build_engine_config
    from raylm.options import engine_kwargs

    engine = AsyncEngine(build_engine_config(**engine_kwargs(args)))
    engine.warmup()

    async def send(i: int) -> RequestOutput:
        return await _send(engine, requests[i], args)

    try:
        yield send
    finally:
        engine.shutdown()


async def _send(engine, req: BenchRequest, args: argparse.Namespace) -> RequestOutput:
    from raylm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=req.output_len, temperature=args.temperature,
                            ignore_eos=args.ignore_eos, output_kind="delta")
    out = RequestOutput(prompt_len=req.prompt_len, expected_output_len=req.output_len)
    out.start = last = time.perf_counter()
    tokens = 0
    try:
        async for delta in engine.generate(req.prompt, params, f"bench-{uuid.uuid4().hex}"):
            now = time.perf_counter()
            tokens += sum(len(c.token_ids) for c in delta.outputs)
            if delta.prompt_token_ids:
                out.usage_prompt_tokens = len(delta.prompt_token_ids)
            if not any(c.text for c in delta.outputs):
                continue
            if out.ttft is None:
                out.ttft = now - out.start
            else:
                out.itl.append(now - last)
            last, out.chunks = now, out.chunks + 1
        out.e2el = time.perf_counter() - out.start
        out.usage_output_tokens, out.success = tokens, out.chunks > 0
    except Exception as exc:  # same contract as the HTTP sender: failures are data
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def run_alternating(args: argparse.Namespace, requests: List[BenchRequest]
                          ) -> Tuple[List[RequestOutput], List[RequestOutput], float]:
    """`--alternate-inprocess`: each request in turn through an in-process AsyncEngine and
    over HTTP, one at a time (even requests in-process first, odd ones HTTP first), so both
    see the machine in the same state: a paired difference is the HTTP path's cost, whatever
    the machine's speed did meanwhile. Returns (HTTP outputs, in-process outputs, the HTTP
    requests' summed wall time)."""
    served, reference = [], []
    async with inprocess_sender(args, requests) as local, http_sender(args, requests) as remote:
        t0 = time.perf_counter()
        for i in range(len(requests)):
            if i % 2 == 0:
                ref, out = await local(i), await remote(i)
            else:
                out, ref = await remote(i), await local(i)
            ref.start, out.start = ref.start - t0, out.start - t0
            reference.append(ref)
            served.append(out)
    return served, reference, sum(o.e2el or 0.0 for o in served)
