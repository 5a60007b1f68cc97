"""Serving metrics with vLLM's names (prefix `raylm:`), labelled by DP rank.

One observation path, two sinks: `PromSink` (prometheus-client, served at /metrics by the
ingress) and `RaySink` (ray.util.metrics, exported to the Ray dashboard by each engine
replica). `RequestTimer` turns a stream of cumulative outputs into TTFT / ITL / E2E.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

_LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0]

HISTOGRAMS = {
    "time_to_first_token_seconds": "Time to first token",
    "inter_token_latency_seconds": "Time between consecutive output tokens",
    "e2e_request_latency_seconds": "End-to-end request latency",
}
COUNTERS = {
    "prompt_tokens_total": "Prompt tokens processed",
    "generation_tokens_total": "Output tokens generated",
    "request_success_total": "Requests finished (label finished_reason)",
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache",
    "num_preemptions_total": "Requests preempted",
}
GAUGES = {
    "num_requests_running": "Requests in the running batch",
    "num_requests_waiting": "Requests waiting to be scheduled",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (0..1)",
}


class PromSink:
    """prometheus-client metrics in a private registry (one per app instance)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        label = ["model_name", "dp_rank"]
        self.hist = {k: Histogram(f"raylm:{k}", d, label, buckets=_LATENCY_BUCKETS,
                                  registry=self.registry)
                     for k, d in HISTOGRAMS.items()}
        self.counters = {k: Counter(f"raylm:{k.removesuffix('_total')}", d,
                                    label
                                    + (["finished_reason"] if k == "request_success_total"
                                       else []), registry=self.registry)
                         for k, d in COUNTERS.items()}
        self.gauges = {k: Gauge(f"raylm:{k}", d, label, registry=self.registry)
                       for k, d in GAUGES.items()}
        self.engine_info = Gauge("raylm:engine_info",
                                 "1 per live engine replica: its process and node",
                                 label + ["pid", "node_ip"], registry=self.registry)
        from raylm.dp.metrics import DESCRIPTIONS, PER_RANK

        self.lockstep = {k: Gauge(f"raylm:{k}", d, ["dp_rank"] if k in PER_RANK else [],
                                  registry=self.registry) for k, d in DESCRIPTIONS.items()}

    def observe(self, name: str, value: float, tags: Dict[str, str]) -> None:
        self.hist[name].labels(**tags).observe(value)

    def inc(self, name: str, value: float, tags: Dict[str, str]) -> None:
        if value:
            self.counters[name].labels(**tags).inc(value)

    def set(self, name: str, value: float, tags: Dict[str, str]) -> None:
        self.gauges[name].labels(**tags).set(value)

    def set_lockstep(self, name: str, value: float, tags: Dict[str, str]) -> None:
        gauge = self.lockstep[name]
        (gauge.labels(**tags) if tags else gauge).set(value)

    def set_engines(self, model_name: str, stats: List[Dict]) -> None:
        """One `engine_info` series per live replica (a replaced one's old pid disappears)."""
        self.engine_info.clear()
        for s in stats:
            self.engine_info.labels(model_name=model_name, dp_rank=str(s.get("dp_rank", 0)),
                                    pid=str(s.get("pid", "")),
                                    node_ip=str(s.get("node_ip", ""))).set(1)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class RaySink:
    """The same metrics through ray.util.metrics, for the Ray dashboard."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("model_name", "dp_rank")
        self.hist = {k: Histogram(f"raylm_{k}", d, boundaries=_LATENCY_BUCKETS, tag_keys=keys)
                     for k, d in HISTOGRAMS.items()}
        self.counters = {k: Counter(f"raylm_{k.removesuffix('_total')}", d,
                                    tag_keys=keys
                                    + (("finished_reason",
                                       ) if k == "request_success_total" else ()))
                         for k, d in COUNTERS.items()}
        self.gauges = {k: Gauge(f"raylm_{k}", d, tag_keys=keys) for k, d in GAUGES.items()}

    def observe(self, name: str, value: float, tags: Dict[str, str]) -> None:
        self.hist[name].observe(value, tags=tags)

    def inc(self, name: str, value: float, tags: Dict[str, str]) -> None:
        if value:
            self.counters[name].inc(value, tags=tags)

    def set(self, name: str, value: float, tags: Dict[str, str]) -> None:
        self.gauges[name].set(value, tags=tags)

    def set_engines(self, model_name: str, stats: List[Dict]) -> None:
        """`engine_info` lives on the ingress's /metrics only (it lists every replica)."""


class RequestTimer:
    """Feed it each output of one request (cumulative, or deltas when `deltas`); on finish
    it records every metric."""

    def __init__(self, sink, model_name: str, num_prompt_tokens: int,
                 deltas: bool = False) -> None:
        self.sink, self.model_name, self.deltas = sink, model_name, deltas
        self.start = time.monotonic()
        self.last: Optional[float] = None
        self.num_prompt_tokens = num_prompt_tokens
        self.seen: Dict[int, int] = {}  # choice index -> tokens seen

    def update(self, output, dp_rank: int) -> None:
        now = time.monotonic()
        tags = {"model_name": self.model_name, "dp_rank": str(dp_rank)}
        new = sum(len(c.token_ids) - (0 if self.deltas else self.seen.get(c.index, 0))
                  for c in output.outputs)
        if new:
            if self.last is None:
                self.sink.observe("time_to_first_token_seconds", now - self.start, tags)
            else:
                self.sink.observe("inter_token_latency_seconds", (now - self.last) / new, tags)
            self.last = now
            self.sink.inc("generation_tokens_total", new, tags)
        self.seen = {c.index: len(c.token_ids) for c in output.outputs}
        if output.finished:
            self.sink.observe("e2e_request_latency_seconds", now - self.start, tags)
            self.sink.inc("prompt_tokens_total", self.num_prompt_tokens, tags)
            for c in output.outputs:
                self.sink.inc("request_success_total", 1,
                              {**tags, "finished_reason": c.finish_reason or "abort"})


def publish_engine_stats(sink, model_name: str, stats: List[Dict], last: Dict[str, Dict]) -> None:
    """Engine gauges and cumulative counters from coordinator/engine stats (counters advance
    by the difference from the previous snapshot `last`, which is updated in place)."""
    sink.set_engines(model_name, stats)
    for s in stats:
        rank = str(s.get("dp_rank", 0))
        tags = {"model_name": model_name, "dp_rank": rank}
        sink.set("num_requests_running", s.get("num_running", 0), tags)
        sink.set("num_requests_waiting", s.get("num_waiting", 0), tags)
        sink.set("kv_cache_usage_perc", s.get("kv_cache_usage", 0.0), tags)
        prev = last.get(rank, {})
        for key, counter in (("prefix_cache_queries", "prefix_cache_queries_total"),
                             ("prefix_cache_hits", "prefix_cache_hits_total"),
                             ("num_preemptions", "num_preemptions_total")):
            sink.inc(counter, max(0, s.get(key, 0) - prev.get(key, 0)), tags)
        last[rank] = s
