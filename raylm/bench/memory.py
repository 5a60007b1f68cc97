"""`raylm bench memory --pid P`: PSS of a process tree (e.g. `raylm serve` and every Ray
process it started: GCS, raylet, workers, replicas), summed, in MiB."""
from __future__ import annotations

import json

import psutil


def tree_pss(pid: int) -> dict:
    """Sum of PSS over `pid` and all its descendants (processes that vanish are skipped)."""
    root = psutil.Process(pid)
    total, count = 0, 0
    for proc in [root] + root.children(recursive=True):
        try:
            total += proc.memory_full_info().pss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"pid": pid, "processes": count, "pss_mib": total / (1 << 20)}


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("memory", help="PSS of a process tree (a running raylm serve)")
    p.add_argument("--pid", type=int, required=True)
    p.set_defaults(func=lambda args: print(json.dumps(tree_pss(args.pid))) or 0)
