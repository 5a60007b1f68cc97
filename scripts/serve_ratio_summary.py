"""Summarize scripts/bench_serve_ratio.sh: per dp, each round's offline and served output
tok/s (offline: the mean of the runs before and after the server when both exist), their
ratio, and the median ratio (a markdown table for docs/benchmarks.md). Where the round kept
its server's CPU by process (cpu-*.json), the ratio is split in two: the engine replicas'
share of the machine over the run, and their CPU per output token against the offline
engine's (its process's CPU over its timed run; both include OpenMP's spinning).

usage: python scripts/serve_ratio_summary.py OUTDIR
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path


def results(path: Path) -> dict:
    return json.loads(path.read_text())["results"]


def offline_runs(folder: Path, dp: str, r: str) -> list:
    """The offline reference runs of a round: before the server, and with SANDWICH=1 after it."""
    runs = [folder / f"offline-dp{dp}-r{r}.json", folder / f"offline-after-dp{dp}-r{r}.json"]
    return [results(p)["raylm"] for p in runs if p.exists()]


def offline_tok_s(runs: list) -> float:
    """The offline reference's tok/s: the mean of the round's runs."""
    return sum(x["output_tok_s"] for x in runs) / len(runs)


def offline_ms_per_token(runs: list) -> float:
    """The offline engine's CPU per output token (NaN for runs that did not record it)."""
    values = [1e3 * x["cpu_s"] / x["output_tokens"] for x in runs if x.get("cpu_s")]
    return sum(values) / len(values) if values else float("nan")


def engine_split(folder: Path, name: str, run: dict) -> tuple:
    """(engines' share of the machine over the run, their CPU ms per output token), or NaNs."""
    path = folder / name.replace("serve-", "cpu-", 1)
    if not path.exists():
        return float("nan"), float("nan")
    cpu = json.loads(path.read_text())
    engines = sum(p["cpu_s"] for p in cpu["processes"] if "LLMServer" in p["process"])
    share = engines / (run["duration_s"] * cpu["cpus"])
    return share, 1e3 * engines / run["total_output_tokens"]


def main(folder: Path) -> None:
    rounds = sorted(folder.glob("serve-dp*-r*.json"),
                    key=lambda p: (p.name.split("-r")[0], int(p.stem.rsplit("-r", 1)[1])))
    variants = folder / "variants.txt"
    if variants.exists() and variants.read_text().strip():
        print("Variants (server env):\n\n" + variants.read_text())
    print("| dp | round | offline tok/s | served tok/s | served / offline | failed "
          "| engines' share | engine ms/token | offline ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, shares, costs = {}, {}, {}
    for path in rounds:
        dp, r = re.match(r"serve-dp(\w+)-r(\d+)\.json", path.name).groups()
        run = results(path)
        runs = offline_runs(folder, dp, r)
        offline = offline_tok_s(runs)
        served, failed = run["output_throughput"], run["failed"]
        share, engine_ms = engine_split(folder, path.name, run)
        offline_ms = offline_ms_per_token(runs)
        ratios.setdefault(dp, []).append(served / offline)
        shares.setdefault(dp, []).append(share)
        costs.setdefault(dp, []).append(offline_ms / engine_ms)
        print(f"| {dp} | {r} | {offline:.1f} | {served:.1f} | {served / offline:.2f}x | {failed} "
              f"| {share:.1%} | {engine_ms:.2f} | {offline_ms:.2f} |")
    for dp, values in ratios.items():
        print(f"\ndp {dp}: median {statistics.median(values):.2f}x over {len(values)} rounds "
              f"(min {min(values):.2f}x, max {max(values):.2f}x)")
        split = [(a, b) for a, b in zip(shares[dp], costs[dp]) if not math.isnan(a + b)]
        if split:
            print(f"dp {dp}: engines' share of the machine median "
                  f"{statistics.median(a for a, _ in split):.1%}; offline CPU per token over the "
                  f"engines' median {statistics.median(b for _, b in split):.2f}x ({len(split)} "
                  "rounds)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
