"""`raylm bench ...` subcommands: throughput, step, memory, latency, serve, kernels, sim-check,
routing, plot, sim-capacity, structured."""
from __future__ import annotations


def add_bench_parser(sub, add_engine_args) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from raylm.bench import (capacity, kernels, latency, memory, plot, routing, serve, sim_check,
                             step, structured, throughput)

    throughput.add_parser(bench_sub, add_engine_args)
    step.add_parser(bench_sub, add_engine_args)
    memory.add_parser(bench_sub, add_engine_args)
    latency.add_parser(bench_sub, add_engine_args)
    serve.add_parser(bench_sub, add_engine_args)
    kernels.add_parser(bench_sub)
    sim_check.add_parser(bench_sub, add_engine_args)
    routing.add_parser(bench_sub)
    plot.add_parser(bench_sub)
    capacity.add_parser(bench_sub)
    structured.add_parser(bench_sub, add_engine_args)
