"""Benchmark reporting shared by every `raylm bench ...`: a text table, atomic JSON,
machine facts, and an optional bar plot (only when matplotlib is installed)."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from typing import Any, List, Optional, Sequence, Tuple, Union

# A column is a key, (key, header) or (key, header, format spec such as ".1f").
Column = Union[str, Tuple[str, str], Tuple[str, str, str]]


def _column(col: Column) -> Tuple[str, str, Optional[str]]:
    if isinstance(col, str):
        return col, col, None
    if len(col) == 2:
        return col[0], col[1], None
    return col[0], col[1], col[2]


def format_value(value: Any, spec: Optional[str] = None) -> str:
    """One cell: `spec` if given, else ints as is, floats with 4 significant digits (no
    scientific notation below 1e6), None as '-'."""
    if value is None:
        return "-"
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return (f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e6
                else f"{value:.{_decimals(value)}f}")
    return str(value)


def _decimals(value: float) -> int:
    magnitude = abs(value)
    return 3 if magnitude < 1 else 2 if magnitude < 100 else 1


def format_table(rows: List[dict], columns: Sequence[Column]) -> str:
    """Rows (dicts) as an aligned text table: first column left-aligned, the rest right."""
    cols = [_column(c) for c in columns]
    cells = [[format_value(row.get(key), spec) for key, _, spec in cols] for row in rows]
    headers = [header for _, header, _ in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: List[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w)
                 for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def print_table(rows: List[dict], columns: Sequence[Column], file=None) -> None:
    """Print `format_table(rows, columns)` (to stdout unless `file` is given)."""
    print(format_table(rows, columns), file=file or sys.stdout, flush=True)


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON atomically: a temp file in the same dir, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def machine_info() -> dict:
    """Facts that decide CPU benchmark figures: cores, torch build and threads, versions."""
    import torch

    return {"cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def dtype_info(llm) -> dict:
    """What an in-process engine's dtype option resolved to (auto picks per machine)."""
    runner = getattr(getattr(llm.engine.core.executor, "worker", None), "runner", None)
    if runner is None:
        return {}
    d = runner.dtypes
    return {"dtype_resolved": str(d.weights).removeprefix("torch."),
            "gemm_dtype": str(d.gemm).removeprefix("torch."), "dtype_reason": d.reason}


def plot_bars(path: str, labels: Sequence[str], values: Sequence[float], ylabel: str,
              title: str = "") -> bool:
    """A bar chart to `path`; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install 'raylm[plot]')",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(list(labels), list(values),
                  color=["tab:blue", "tab:orange", "tab:green"][:len(values)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
