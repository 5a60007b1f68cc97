"""`raylm bench routing`: what routing costs as the fleet grows, in one process.

The real DPRouter (each policy) chooses among R fake replicas whose coordinator reports are
realistic: random loads, and a prefix summary of `--cached-blocks` cached blocks each (the
summary holds about one hash in 8). Each request carries a `--prompt-len` prompt that
shares a prefix with one replica's cache; the router books it, Serve's confirmation and
completion follow, so the bookkeeping stays at steady state. Reported per R and policy:
the router's decision time per request (hashing the prompt included). For the DP
coordinator: the time of one replica's report, and of the long poll that hands it to a
router (`changes`, pickled as Ray would) with its size; the whole table pickled, which
the routers used to receive at every change, for comparison. At a push per replica every
100 ms, the coordinator's work per second is (report + poll x routers) x 10 x replicas.
No Ray RPCs are timed here; `--ray` measures the coordinator over real ones instead
(raylm.bench.routing_ray: its CPU per report, the push round trip, the update latency).
"""
from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import statistics
import time
from types import SimpleNamespace
from typing import Dict, List

from raylm.bench.report import machine_info, print_table, write_json

BLOCK = 16


def add_parser(sub) -> None:
    p = sub.add_parser("routing", help="router decision time and coordinator cost by fleet size")
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--policies", nargs="+", default=None, help="default: every registered policy")
    p.add_argument("--requests", type=int, default=2000,
                   help="routing decisions timed per fleet and policy")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--cached-blocks", type=int, default=2048, help="cached KV blocks per replica")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", action="store_true",
                   help="the coordinator over real Ray RPCs (routing_ray)")
    p.add_argument("--engines-per-process", type=int, default=8,
                   help="--ray: engines per reporting process")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="--ray: measured seconds per fleet size")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_routing)


def fleet_table(n: int, cached_blocks: int, prompts: List[List[int]],
                rng: random.Random) -> Dict[str, Dict]:
    """Reports of `n` replicas: random queues; replica i caches prompt i % len(prompts) and
    random other chains, `cached_blocks` blocks in all."""
    from raylm.dp.prefix import is_summary_depth, prefix_hashes

    table = {}
    for i in range(n):
        chains = [prompts[i % len(prompts)]]
        while sum(len(c) // BLOCK for c in chains) < cached_blocks:
            chains.append([rng.randrange(50_000) for _ in range(1024)])
        summary = frozenset(h for c in chains for d, h in enumerate(prefix_hashes(c, BLOCK), 1)
                            if is_summary_depth(d))
        table[f"replica-{i:03d}"] = {"num_waiting": rng.randrange(4),
                                     "num_running": rng.randrange(32), "block_size": BLOCK,
                                     "prefix_blocks": summary, "prefix_version": 1, "dp_rank": i,
                                     "computed_at": 0.0}
    return table


async def time_router(policy: str, table: Dict[str, Dict], prompts: List[List[int]],
                      requests: int) -> float:
    """Median seconds per choose_replicas (with Serve's confirm and complete after each)."""
    from raylm.dp.router import DPRouter

    router = object.__new__(DPRouter)  # Serve's constructor needs a running deployment
    router.initialize_state(policy=policy)
    router._table = table
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=k), routing_stats={})
                for k in table]
    samples = []
    for i in range(requests):
        pending = SimpleNamespace(kwargs={"prompt_token_ids": prompts[i % len(prompts)]},
                                  metadata=SimpleNamespace(internal_request_id=f"r{i}"))
        start = time.perf_counter()
        ranked = await router.choose_replicas(replicas, pending)
        samples.append(time.perf_counter() - start)
        router.on_request_routed(pending, ranked[0][0].replica_id, None)
        router.on_request_completed(ranked[0][0].replica_id, f"r{i}")
    return statistics.median(samples)


async def time_coordinator(table: Dict[str, Dict], rounds: int = 200) -> Dict[str, float]:
    """Median us of one report (a replica's stats, no summary change); of the long poll a
    router makes after it (`changes`: that one entry) and its pickling, and its KiB; the
    whole table (`snapshot`) pickled, for comparison."""
    from raylm.dp.coordinator import DPCoordinator

    coordinator = DPCoordinator()
    for key, stats in table.items():
        await coordinator.report(key, stats)
    light = {k: {s: v for s, v in stats.items() if s != "prefix_blocks"}
             for k, stats in table.items()}
    keys, reports, polls = list(table), [], []
    for i in range(rounds):
        known = coordinator.version
        start = time.perf_counter()
        await coordinator.report(keys[i % len(keys)], light[keys[i % len(keys)]])
        reports.append(time.perf_counter() - start)
        start = time.perf_counter()
        change = pickle.dumps(await coordinator.changes(known, 0.0))
        polls.append(time.perf_counter() - start)
    start = time.perf_counter()
    full = pickle.dumps(await coordinator.snapshot(-1, 0.0))
    full_s = time.perf_counter() - start
    return {"report_us": statistics.median(reports) * 1e6,
            "poll_us": statistics.median(polls) * 1e6, "poll_kib": len(change) / 1024,
            "full_us": full_s * 1e6, "full_kib": len(full) / 1024}


def cmd_routing_ray(args: argparse.Namespace) -> int:
    from raylm.bench.routing_ray import run

    rows = run(args.replicas, args.engines_per_process, args.seconds)
    print(f"DP coordinator over Ray RPCs ({machine_info()['processor']}): every engine reports a "
          f"changed load every 100 ms, {args.engines_per_process} engines per reporting process, "
          "one router polling.")
    print_table(rows, [("engines", "engines"), ("processes", "processes"),
                       ("coordinator_core_pct", "coordinator % core", ".1f"),
                       ("cpu_us_per_report", "CPU us/report", ".1f"),
                       ("push_rtt_ms_p50", "push RTT ms", ".2f"),
                       ("update_ms_p50", "update ms p50", ".2f"),
                       ("update_ms_p99", "update ms p99", ".2f")])
    if args.output_json:
        write_json(args.output_json,
                   {"benchmark": "routing_ray", "args": vars(args) | {"func": None},
                    "machine": machine_info(), "results": rows})
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from raylm.dp.policies import ROUTING_POLICIES

    if args.ray:
        return cmd_routing_ray(args)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(50_000) for _ in range(args.prompt_len)] for _ in range(16)]
    rows = []
    for n in args.replicas:
        table = fleet_table(n, args.cached_blocks, prompts, rng)
        coord = asyncio.run(time_coordinator(table))
        for policy in args.policies or list(ROUTING_POLICIES):
            decision = asyncio.run(time_router(policy, table, prompts, args.requests))
            rows.append({"replicas": n, "policy": policy, "decision_us": decision * 1e6, **coord,
                         "summary_hashes": len(next(iter(table.values()))["prefix_blocks"])})
    print(f"Routing cost in one process ({machine_info()['processor']}); prompts of "
          f"{args.prompt_len} tokens, {args.cached_blocks} cached blocks per replica.")
    print_table(rows,
                [("replicas", "replicas"), ("policy", "policy"),
                 ("decision_us", "decision us", ".1f"), ("report_us", "report us", ".1f"),
                 ("poll_us", "poll us", ".1f"), ("poll_kib", "poll KiB", ".1f"),
                 ("full_us", "full table us", ".0f"), ("full_kib", "full KiB", ".0f")])
    if args.output_json:
        write_json(args.output_json, {"benchmark": "routing", "args": vars(args) | {"func": None},
                                      "machine": machine_info(), "results": rows})
    return 0
