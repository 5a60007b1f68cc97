"""CPU seconds each process on this machine used while a command ran (issue 17: where a
served run's CPU goes). Reads /proc/<pid>/stat (utime + stime, threads included) before and
after; processes that ended in between are lost, so start the server first.

usage: python scripts/cpu_by_process.py [--json OUT] -- CMD [ARG ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def _label(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return ""
    # Ray names its workers by their actor class (ray::ServeReplica:...), so the title says it
    return (cmd or comm)[:90]


def snapshot() -> dict:
    """pid -> (label, cpu seconds so far)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (_label(pid), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def main(argv) -> int:
    json_out = None
    if argv[:1] == ["--json"]:
        json_out, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    before, t0 = snapshot(), time.monotonic()
    rc = subprocess.call(argv)
    after, wall = snapshot(), time.monotonic() - t0
    rows = []
    for pid, (label, cpu) in after.items():
        used = cpu - before.get(pid, (label, 0.0))[1]
        if used >= 0.05:
            rows.append({"pid": int(pid), "cpu_s": round(used, 2), "process": label})
    rows.sort(key=lambda r: -r["cpu_s"])
    busy = sum(r["cpu_s"] for r in rows)
    print(f"wall {wall:.1f} s, {os.cpu_count()} CPUs = {wall * os.cpu_count():.1f} CPU-s; "
          f"used {busy:.1f}")
    for r in rows:
        print(f"{r['cpu_s']:8.2f}  {r['pid']:>7}  {r['process']}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"wall_s": wall, "cpus": os.cpu_count(), "processes": rows}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
