"""A load driver for reliability tests: N concurrent streaming clients against an OpenAI
endpoint for a bounded time, some disconnecting mid-stream, each request classified; and
probes of a running server (Prometheus metrics per DP rank, replica processes and RSS).

Outcomes: "ok" (streamed to [DONE] with the expected text), "mismatch" (finished, wrong
text), "disconnected" (the client left on purpose), "error:<status or code>" (an explicit
HTTP or in-band SSE error), "lost" (anything else: transport failure, no answer, a stream
that ended without [DONE] or an error). A healthy server has zero "lost" and "mismatch".
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import httpx


@dataclass
class Record:
    client: int
    rank: Optional[int]  # X-data-parallel-rank pin, if any
    start: float
    end: float = 0.0
    outcome: str = "lost"
    detail: str = ""
    chunks: int = 0  # stream events with text received so far


@dataclass
class SoakReport:
    records: List[Record] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        return counts(self.records)

    def lost(self) -> List[Record]:
        return [r for r in self.records if r.outcome in ("lost", "mismatch")]


@dataclass
class Workload:
    """Token-id prompts, their greedy references, and request shape."""

    prompts: Sequence[List[int]]
    expected: Sequence[str]
    max_tokens: Sequence[int]  # per prompt: varied lengths keep completions from lining up
    headers: Dict[str, str]
    disconnect_every: int = 5  # every k-th request of a client leaves after its first chunk


async def stream_one(http: httpx.AsyncClient, work: Workload, rec: Record, i: int,
                     leave: bool) -> None:
    """Send prompt `i` of `work` as one streaming completion (pinned to `rec.rank`, if set);
    `rec` records its outcome, end and progress (`chunks`) as it goes."""
    body = {"prompt": list(work.prompts[i]), "max_tokens": work.max_tokens[i], "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = dict(work.headers)
    if rec.rank is not None:
        headers["X-data-parallel-rank"] = str(rec.rank)
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                rec.outcome, rec.detail = f"error:{r.status_code}", r.text[:200]
                return
            await _read_events(r, work.expected[i], rec, leave)
    except (httpx.HTTPError, OSError) as exc:
        rec.outcome, rec.detail = "lost", repr(exc)[:200]
    finally:
        rec.end = time.monotonic()


async def _read_events(r: httpx.Response, expected: str, rec: Record, leave: bool) -> None:
    text, done, finished = [], False, False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            rec.outcome, rec.detail = (f"error:{event['error'].get('code')}",
                                       event["error"].get("message", "")[:200])
            return
        if leave:
            rec.outcome = "disconnected"
            return  # closing the response drops the connection mid-stream
        rec.chunks += 1
        for choice in event["choices"]:
            text.append(choice["text"])
            finished = finished or choice.get("finish_reason") is not None
    if done and finished:
        rec.outcome = "ok" if "".join(text) == expected else "mismatch"
        rec.detail = "" if rec.outcome == "ok" else "".join(text)[:200]


async def soak(url: str, work: Workload, clients: int, duration_s: float,
               pin: Callable[[int], Optional[int]] = lambda c: None, timeout_s: float = 120.0,
               stop: Optional[asyncio.Event] = None) -> SoakReport:
    """`clients` loops, each sending one streaming request after another until `duration_s`
    has passed or `stop` is set."""
    report = SoakReport()
    end = time.monotonic() + duration_s
    stop = stop or asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < end and not stop.is_set():
            rec = Record(client=c, rank=pin(c), start=time.monotonic())
            report.records.append(rec)
            leave = (work.disconnect_every > 0 and (k + c) % work.disconnect_every
                     == work.disconnect_every - 1)
            await stream_one(http, work, rec, (c * 7 + k) % len(work.prompts), leave)
            k += 1

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return report


def counts(records: Sequence[Record]) -> Dict[str, int]:
    return dict(Counter(r.outcome for r in records))


# ---- probes of a running server ------------------------------------------------------

def parse_metric(text: str, name: str) -> Dict[int, float]:
    """{dp_rank: value summed over other labels} for the raylm:<name> lines of /metrics."""
    out: Dict[int, float] = {}
    for line in text.splitlines():
        m = re.match(rf'^raylm:{name}\{{(.*)\}} ([0-9.e+-]+)$', line)
        if m:
            rank = int(re.search(r'dp_rank="(\d+)"', m.group(1)).group(1))
            out[rank] = out.get(rank, 0.0) + float(m.group(2))
    return out


def metric(url: str, name: str, headers: Dict[str, str]) -> Dict[int, float]:
    return parse_metric(httpx.get(url + "/metrics", headers=headers, timeout=30).text, name)


def engine_pids(text: str) -> Dict[int, int]:
    """{dp_rank: pid} of the live engine replicas, from /metrics' raylm:engine_info."""
    found = re.findall(r'^raylm:engine_info\{[^}]*dp_rank="(\d+)"[^}]*pid="(\d+)"[^}]*\} 1\.0$',
                       text, re.M)
    return {int(rank): int(pid) for rank, pid in found}


def wait_all_free(url: str, headers: Dict[str, str], timeout_s: float = 30) -> None:
    """Every engine idle with every KV block back in the free pool (kv usage exactly 0)."""
    from tests.waiting import wait_for

    seen = {}

    def idle() -> bool:
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            seen[name] = metric(url, name, headers)
        return all(v == 0 for m in seen.values() for v in m.values())

    wait_for(idle, timeout_s, "engines idle with every KV block free", 0.5, detail=lambda: seen)


def replicas(kind: str = ""):
    """psutil Processes of the `raylm` app's Serve replicas (of deployment `kind`, if given)."""
    import psutil

    tag = f"ServeReplica:raylm:{kind}"
    return [p for p in psutil.process_iter(["cmdline"])
            if tag in " ".join(p.info["cmdline"] or [])]


def rss_mib() -> float:
    """RSS of the app's Serve replica processes (the engines and the ingress)."""
    return sum(p.memory_info().rss for p in replicas()) / 2**20
