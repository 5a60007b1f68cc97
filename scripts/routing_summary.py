"""Markdown tables from a scripts/bench_routing_fleet.sh output folder: per workload, one row
per load and policy (TTFT mean / p50 / p99, TPOT p50, goodput), in simulated-time ms.
Usage: python scripts/routing_summary.py OUT_DIR"""
import json
import sys
from pathlib import Path

POLICIES = ["least_loaded", "power_of_two", "round_robin", "prefix_aware"]


def main(folder: Path) -> None:
    for workload in ("trace", "prefix"):
        runs = sorted((folder / workload).glob("*_l*.json"))
        if not runs:
            continue
        loads = sorted({float(p.stem.rsplit("_l", 1)[1]) for p in runs})
        print(f"\n{workload}:\n")
        print("| load | rate req/s | policy | TTFT mean / p50 / p99 ms | TPOT p50 ms | goodput "
              "req/s |")
        print("|---:|---:|---|---|---:|---:|")
        for load in loads:
            cap = json.loads((folder / f"capacity_{workload}_l{load:g}.json").read_text())
            for policy in POLICIES:
                path = folder / workload / f"{policy}_l{load:g}.json"
                if not path.exists():
                    continue
                r = json.loads(path.read_text())["results"]
                print(f"| {load:g} | {cap['request_rate']:.2f} | {policy} | "
                      f"{r['mean_ttft_ms']:,.0f} / {r['p50_ttft_ms']:,.0f} / "
                      f"{r['p99_ttft_ms']:,.0f} | {r['p50_tpot_ms']:,.0f} | "
                      f"{r['request_goodput']:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
