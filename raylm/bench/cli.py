"""`raylm bench ...` subcommands (filled in by raylm.bench.throughput)."""
from __future__ import annotations


def add_bench_parser(sub, add_engine_args) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from raylm.bench import throughput

    throughput.add_parser(bench_sub, add_engine_args)
