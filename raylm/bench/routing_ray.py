"""`raylm bench routing --ray`: the DP coordinator's cost and update latency over real Ray RPCs.

A local Ray cluster runs the real DPCoordinator actor; fake engine hosts (one actor per
`--engines-per-process` engines, as `raylm serve --engines-per-replica` groups them) push
every engine's report every 100 ms, each a changed load (the worst case: a busy fleet
changes every tick; an idle one sends a heartbeat a second); one router-side poller
follows `changes()` as DPRouter does. Measured per fleet size, over `--seconds`: the
coordinator process's CPU (share of a core, and per report), the push call's round trip,
and the update latency (an engine computing its stats -> the poller holding them).
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Dict, List

PUSH_S = 0.1  # as LLMServer.PUSH_INTERVAL_S


class _EngineHost:
    """Reports for `n` fake engines every PUSH_S, as one LLMServer hosting them does."""

    def __init__(self, coordinator, prefix: str, n: int) -> None:
        self.coordinator, self.keys = coordinator, [f"{prefix}/{i}" for i in range(n)]
        self.rtts: List[float] = []
        self.task = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        tick = 0
        while True:
            tick += 1
            now = time.time()
            reports = {k: {"num_waiting": tick % 3, "num_running": (tick + i) % 8,
                           "computed_at": now, "dp_rank": i, "block_size": 16}
                       for i, k in enumerate(self.keys)}
            start = time.perf_counter()
            await self.coordinator.report_many.remote(reports)
            self.rtts.append(time.perf_counter() - start)
            await asyncio.sleep(max(0.0, PUSH_S - (time.perf_counter() - start)))

    async def rtts_s(self) -> List[float]:
        return self.rtts


class _Poller:
    """A router's long poll on `changes()`; records computed_at -> received for each entry."""

    def __init__(self, coordinator) -> None:
        self.coordinator, self.lags, self.version, self.seen = coordinator, [], -1, set()

    async def run(self, seconds: float) -> List[float]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            version, changed, _ = await self.coordinator.changes.remote(self.version, 1.0)
            now = time.time()
            if self.version >= 0:
                self.lags += [now - s["computed_at"] for s in changed.values()
                              if "computed_at" in s]
            self.seen.update(changed)
            self.version = version
        return self.lags

    async def engines_seen(self) -> int:
        return len(self.seen)


def _coordinator_class():
    from raylm.dp.coordinator import DPCoordinator

    class TimedCoordinator(DPCoordinator):
        def cpu_s(self) -> float:
            t = os.times()
            return t.user + t.system

    return TimedCoordinator


def measure(engines: int, per_process: int, seconds: float) -> Dict[str, float]:
    """One fleet size on the running Ray cluster; medians and p99s in us / ms."""
    import ray

    from raylm.bench.serve_metrics import latency_stats

    coordinator = ray.remote(_coordinator_class()).options(num_cpus=0).remote()
    hosts = [ray.remote(_EngineHost).options(num_cpus=0).remote(coordinator, f"replica-{p}",
                                                                per_process)
             for p in range(max(1, engines // per_process))]
    poller = ray.remote(_Poller).options(num_cpus=0).remote(coordinator)
    ray.get([h.start.remote() for h in hosts], timeout=60)
    time.sleep(1.0)  # past start-up
    cpu0, wall0 = ray.get(coordinator.cpu_s.remote(), timeout=60), time.monotonic()
    lags = ray.get(poller.run.remote(seconds), timeout=seconds + 60)
    cpu = ray.get(coordinator.cpu_s.remote(), timeout=60) - cpu0
    wall = time.monotonic() - wall0
    seen = ray.get(poller.engines_seen.remote(), timeout=60)
    rtts = [x for h in hosts for x in ray.get(h.rtts_s.remote(), timeout=60)]
    for actor in hosts + [poller, coordinator]:
        ray.kill(actor)
    reports = engines / PUSH_S * wall
    rtt, lag = latency_stats(rtts, [99]), latency_stats(lags, [99])
    return {"engines": engines, "processes": len(hosts), "engines_seen": seen,
            "coordinator_core_pct": 100 * cpu / wall,
            "cpu_us_per_report": 1e6 * cpu / reports, "push_rtt_ms_p50": rtt["median"],
            "update_ms_p50": lag["median"], "update_ms_p99": lag["p99"]}


def run(fleets: List[int], per_process: int, seconds: float) -> List[Dict[str, float]]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return [measure(n, min(per_process, n), seconds) for n in fleets]
    finally:
        ray.shutdown()
