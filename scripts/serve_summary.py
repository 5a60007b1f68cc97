"""Markdown tables from a scripts/bench_serve.sh output folder: the serving path against its
references (offline LLM, in-process AsyncEngine) and against llama-server.
Usage: python scripts/serve_summary.py OUTDIR"""
import json
import statistics
import sys
from pathlib import Path


# (file tag, label): bench_serve.sh's servers (dp1p: dp 1 through Serve's HTTP proxy)
RUNS = [("1", "dp 1"), ("2", "dp 2"), ("1p", "dp 1 --proxy")]


def load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def serve_row(label: str, data, ref_tok_s=None, ref_ttft=None) -> str:
    """One table row; c1 runs show what they added to the first token: paired with the
    in-process engine request by request when they alternated with it, else against the
    separate in-process run's median."""
    if data is None:
        return f"| {label} | (not run) | | | | | |"
    r, paired = data["results"], data.get("paired")
    ratio = f" ({r['output_throughput'] / ref_tok_s:.2f}x offline)" if ref_tok_s else ""
    added = ""
    if paired:
        added = f"{paired['added_ttft_ms']['median']:+.1f} (paired, {paired['pairs']})"
    elif ref_ttft is not None:
        added = f"{r['median_ttft_ms'] - ref_ttft:+.1f} (vs separate run)"
    return (f"| {label} | {r['completed']}/{r['completed'] + r['failed']} | "
            f"{r['output_throughput']:.1f}{ratio} | {r['median_ttft_ms']:.1f} | {added} | "
            f"{r['p99_ttft_ms']:.1f} | {r['median_tpot_ms']:.2f} |")


def _tpot(reqs, i: int):
    ttft, e2el, n = reqs["ttfts"][i], reqs["e2els"][i], reqs["output_lens"][i]
    return (e2el - ttft) / (n - 1) if ttft is not None and e2el and n > 1 else None


def paired_row(label: str, data) -> str:
    """A c1 run that alternated with the in-process engine: the medians of its per-request
    ratios to the in-process run of the same request (TTFT, TPOT, end-to-end), and the ratio
    of the summed end-to-end times. Below 1: faster than our engine in the same minute."""
    if not data or not data.get("paired"):
        return f"| {label} | (not run) | | | | |"
    ours, ref = data["requests"], data["paired"]["reference_requests"]
    ratios = {"ttfts": [], "tpot": [], "e2els": []}
    sums = [0.0, 0.0]
    for i, ok in enumerate(ours["success"]):
        if not ok or not ref["success"][i]:
            continue
        sums = [sums[0] + ours["e2els"][i], sums[1] + ref["e2els"][i]]
        for key in ("ttfts", "e2els"):
            ratios[key].append(ours[key][i] / ref[key][i])
        if _tpot(ours, i) and _tpot(ref, i):
            ratios["tpot"].append(_tpot(ours, i) / _tpot(ref, i))
    med = {k: statistics.median(v) for k, v in ratios.items()}
    return (f"| {label} | {len(ratios['e2els'])} | {med['ttfts']:.3f} | {med['tpot']:.3f} | "
            f"{med['e2els']:.3f} | {sums[0] / sums[1]:.3f} |")


def offline_tok_s(folder: Path, tag: str, default):
    """The offline reference run right before server `tag` (bench_serve.sh), else `default`."""
    data = load(folder, f"offline-{tag}.json")
    return data["results"]["raylm"]["output_tok_s"] if data else default


def main(folder: Path) -> None:
    offline = load(folder, "offline-c32.json")
    ref_tok_s = offline["results"]["raylm"]["output_tok_s"] if offline else None
    inproc = load(folder, "inprocess-c1.json")
    ref_ttft = inproc["results"]["median_ttft_ms"] if inproc else None
    print("| run | completed | output tok/s | median TTFT ms | added TTFT ms (median) | p99 TTFT "
          "ms | median TPOT ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    if ref_tok_s:
        print(f"| offline `LLM`, 32 seqs | | {ref_tok_s:.1f} | | | | |")
    for tag in [f"dp{dp}" for dp, _ in RUNS] + ["llama"]:
        if load(folder, f"offline-{tag}.json"):
            print(f"| offline `LLM`, right before {tag} | | {offline_tok_s(folder, tag, 0):.1f} | "
                  "| | | |")
    print(serve_row("in-process `AsyncEngine`, c1", inproc))
    # c1 rows: TTFT (+ added over the in-process reference); c32 rows: throughput / offline
    for dp, how in RUNS:
        before = offline_tok_s(folder, f"dp{dp}", ref_tok_s)
        print(serve_row(f"raylm serve {how}, c32", load(folder, f"serve-dp{dp}-c32.json"), before))
        print(serve_row(f"raylm serve {how}, c1", load(folder, f"serve-dp{dp}-c1.json"), None,
                        ref_ttft))
    for c in (32, 1):
        print(serve_row(f"llama-server, c{c}", load(folder, f"llama-server-c{c}.json"),
                        offline_tok_s(folder, "llama", ref_tok_s) if c == 32
                        else None, ref_ttft if c == 1 else None))
    for c in (32, 1):
        before = load(folder, f"before-dp1-c{c}.json")
        if before:
            print(serve_row(f"before (previous main) dp 1, c{c}", before,
                            ref_tok_s if c == 32 else None, ref_ttft if c == 1 else None))
    print("\n| c1, each request / the same request in-process | pairs | TTFT | TPOT | end-to-end "
          "| summed end-to-end |\n|---|---:|---:|---:|---:|---:|")
    for dp, how in RUNS:
        print(paired_row(f"raylm serve {how}", load(folder, f"serve-dp{dp}-c1.json")))
    print(paired_row("llama-server", load(folder, "llama-server-c1.json")))
    print("\n| app PSS MiB | idle | under load (c32) |\n|---|---:|---:|")
    for dp, how in RUNS:
        idle, busy = load(folder, f"memory-idle-dp{dp}.json"), load(folder,
                                                                    f"memory-load-dp{dp}.json")
        if idle:
            print(f"| raylm serve {how} ({idle['processes']} processes) | {idle['pss_mib']:.0f} | "
                  f"{busy['pss_mib']:.0f} |" if busy else "|")
    peer = load(folder, "memory-load-llama-c32.json")
    if peer:
        print(f"| llama-server | | {peer['pss_mib']:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
