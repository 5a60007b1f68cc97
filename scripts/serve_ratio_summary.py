"""Summarize scripts/bench_serve_ratio.sh: per dp, each round's offline and served output
tok/s (offline: the mean of the runs before and after the server when both exist), their
ratio, and the median ratio (a markdown table for docs/benchmarks.md).

usage: python scripts/serve_ratio_summary.py OUTDIR
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def results(path: Path) -> dict:
    return json.loads(path.read_text())["results"]


def offline_tok_s(folder: Path, dp: str, r: str) -> float:
    """The offline reference of a round: its run before the server, or with SANDWICH=1 the
    mean of the runs before and after it."""
    runs = [folder / f"offline-dp{dp}-r{r}.json", folder / f"offline-after-dp{dp}-r{r}.json"]
    values = [results(p)["raylm"]["output_tok_s"] for p in runs if p.exists()]
    return sum(values) / len(values)


def main(folder: Path) -> None:
    rounds = sorted(folder.glob("serve-dp*-r*.json"))
    variants = folder / "variants.txt"
    if variants.exists() and variants.read_text().strip():
        print("Variants (server env):\n\n" + variants.read_text())
    print("| dp | round | offline tok/s | served tok/s | served / offline | failed |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for path in rounds:
        dp, r = re.match(r"serve-dp(\w+)-r(\d+)\.json", path.name).groups()
        run = results(path)
        offline = offline_tok_s(folder, dp, r)
        served, failed = run["output_throughput"], run["failed"]
        ratios.setdefault(dp, []).append(served / offline)
        print(f"| {dp} | {r} | {offline:.1f} | {served:.1f} | {served / offline:.2f}x | {failed} |")
    for dp, values in ratios.items():
        print(f"\ndp {dp}: median {statistics.median(values):.2f}x over {len(values)} rounds "
              f"(min {min(values):.2f}x, max {max(values):.2f}x)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
