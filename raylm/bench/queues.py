"""Per-engine queue depth over a `raylm bench serve` run (`--sample-queues SECONDS`).

Scrapes the server's Prometheus `/metrics` on a period while the requests run and keeps
each DP rank's `raylm:num_requests_waiting` and `raylm:num_requests_running` gauges
(vLLM's names, per `dp_rank` label), so `raylm bench plot` can draw how evenly a routing
policy loaded the fleet over time. A failed scrape is skipped, never fatal: the samples
show what the server answered.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import Dict, List, Optional

GAUGES = {"raylm:num_requests_waiting": "waiting", "raylm:num_requests_running": "running"}


def parse_queues(text: str) -> Dict[str, Dict[str, float]]:
    """{"waiting": {rank: value}, "running": {rank: value}} from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[str, Dict[str, float]] = {"waiting": {}, "running": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = GAUGES.get(sample.name)
            if kind is not None and "dp_rank" in sample.labels:
                out[kind][sample.labels["dp_rank"]] = sample.value
    return out


class QueueSampler:
    """Samples of every rank's queue, taken every `interval_s` from `base_url`/metrics."""

    def __init__(self, base_url: str, headers: Dict[str, str], interval_s: float) -> None:
        self.url = base_url.rstrip("/") + "/metrics"
        self.headers, self.interval_s = headers, interval_s
        self.t: List[float] = []
        self.series: Dict[str, Dict[str, List[Optional[float]]]] = {"waiting": defaultdict(list),
                                                                    "running": defaultdict(list)}
        self.failed = 0

    def add(self, t: float, sample: Dict[str, Dict[str, float]]) -> None:
        """Record one scrape at `t` s; ranks missing from it (or new in it) get None."""
        for kind, values in sample.items():
            for rank in set(values) - set(self.series[kind]):
                self.series[kind][rank] = [None] * len(self.t)
            for rank, column in self.series[kind].items():
                column.append(values.get(rank))
        self.t.append(round(t, 3))

    async def run(self, t0: float) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=max(5.0, self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while True:
                started = time.perf_counter()
                try:
                    async with s.get(self.url, headers=self.headers) as r:
                        r.raise_for_status()
                        self.add(started - t0, parse_queues(await r.text()))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    self.failed += 1
                await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - started)))

    def report(self) -> dict:
        ranks = sorted(self.series["waiting"], key=int)
        return {"interval_s": self.interval_s, "t": self.t, "failed_scrapes": self.failed,
                "waiting": {r: self.series["waiting"][r] for r in ranks},
                "running": {r: self.series["running"].get(r, []) for r in ranks}}


@contextlib.asynccontextmanager
async def sampling(sampler: Optional[QueueSampler], t0: float):
    """Run `sampler` (if any) for the duration of the block."""
    task = asyncio.get_running_loop().create_task(sampler.run(t0)) if sampler is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
