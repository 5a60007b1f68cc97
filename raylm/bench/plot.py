"""`raylm bench plot`: `raylm bench serve` JSON reports -> PNG plots against request rate.

Reports are grouped by their `--label` (e.g. the routing policy the server ran), one line
per label: TTFT (p50 solid, p99 dashed), ITL likewise, and goodput (requests/s meeting the
run's --goodput SLOs; request throughput when it had none). The x axis is the run's
--request-rate, or for a trace replay its --trace-time-scale. Reports made with
--sample-queues also give, per load level, `queues_<level>.png`: each engine's requests
(waiting + running) over time, one heat map per label.
  raylm bench plot runs/*.json --out plots/ --title "dp 4, prefix sharing"
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

PANELS = [("ttft", "TTFT (ms)", ["median_ttft_ms", "p99_ttft_ms"]),
          ("itl", "ITL (ms)", ["median_itl_ms", "p99_itl_ms"]),
          ("goodput", "goodput (requests/s)", ["goodput"])]


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="bench serve JSON reports -> PNGs against request rate")
    p.add_argument("reports", nargs="+", help="raylm bench serve --output-json files")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--title", default="")
    p.set_defaults(func=cmd_plot)


def load(paths: Sequence[str]) -> List[dict]:
    reports = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if report.get("benchmark") != "serve":
            raise ValueError(f"{path} is not a `raylm bench serve` report")
        reports.append(report)
    return reports


def rate_of(report: dict) -> float:
    """The run's load level: --request-rate, or a trace replay's time scale."""
    args = report.get("args", {})
    if args.get("trace"):
        return float(args.get("trace_time_scale", 1.0))
    rate = args.get("request_rate")
    if rate is None or (isinstance(rate, float) and math.isinf(rate)) or rate == "inf":
        raise ValueError("a report sent at an infinite request rate has no place on a rate axis")
    return float(rate)


def series(reports: Sequence[dict]) -> Dict[str, Dict[str, List[Tuple[float, float]]]]:
    """label -> metric -> [(rate, value)] sorted by rate (goodput: SLO goodput, else
    request throughput)."""
    out: Dict[str, Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for report in reports:
        label, res, x = report.get("label") or "run", report["results"], rate_of(report)
        for _, _, metrics in PANELS:
            for m in metrics:
                value = res.get("request_goodput") if m == "goodput" else res.get(m)
                if m == "goodput" and value is None:
                    value = res["request_throughput"]
                if value is not None:
                    out[label][m].append((x, float(value)))
    return {label: {m: sorted(points) for m, points in ms.items()} for label, ms in out.items()}


def plot(data: Dict[str, Dict[str, List[Tuple[float, float]]]], out_dir: str, title: str,
         x_label: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, y_label, metrics in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, ms) in enumerate(sorted(data.items())):
            for m, style in zip(metrics, ["-", "--"]):
                if ms.get(m):
                    xs, ys = zip(*ms[m])
                    ax.plot(xs, ys, style, marker="o", color=f"C{i}",
                            label=f"{label} {m.split('_')[0]}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title or y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def queue_matrix(report: dict) -> Tuple[List[float], List[str], List[List[float]]]:
    """(sample times, DP ranks, [rank][sample] waiting + running; nan where not scraped)."""
    q = report.get("queue_depth") or {}
    ranks = list(q.get("waiting", {}))
    rows = []
    for r in ranks:
        pairs = zip(q["waiting"][r], q.get("running", {}).get(r) or [None] * len(q["waiting"][r]))
        rows.append([math.nan if w is None else w + (n or 0) for w, n in pairs])
    return q.get("t", []), ranks, rows


def plot_queues(reports: Sequence[dict], out_dir: str, title: str) -> List[str]:
    """Per load level, one heat map per label of every engine's requests over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels: Dict[float, List[dict]] = defaultdict(list)
    for report in reports:
        if report.get("queue_depth"):
            levels[rate_of(report)].append(report)
    written = []
    for level, group in sorted(levels.items()):
        group = sorted(group, key=lambda r: r.get("label") or "")
        top = max((v for r in group for row in queue_matrix(r)[2] for v in row
                   if not math.isnan(v)), default=1)
        fig, axes = plt.subplots(len(group), 1, figsize=(8, 1.6 + 1.5 * len(group)), squeeze=False,
                                 constrained_layout=True)
        for ax, report in zip(axes[:, 0], group):
            t, ranks, rows = queue_matrix(report)
            image = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                              vmax=top,
                              extent=(t[0] if t else 0, t[-1] if t else 1, len(ranks) - 0.5, -0.5))
            ax.set_title(f"{report.get('label') or 'run'}", fontsize=9)
            ax.set_ylabel("DP rank")
        axes[-1, 0].set_xlabel("time (s)")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="requests (waiting + running)")
        fig.suptitle(f"{title} (load level {level:.3g})" if title else f"load level {level:.3g}",
                     fontsize=10)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"queues_{level:.3g}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def cmd_plot(args: argparse.Namespace) -> int:
    reports = load(args.reports)
    x_label = ("trace time scale" if reports[0].get("args", {}).get("trace")
               else "request rate (req/s)")
    for path in plot(series(reports), args.out, args.title,
                     x_label) + plot_queues(reports, args.out, args.title):
        print(path)
    return 0
