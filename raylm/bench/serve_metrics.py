"""What `raylm bench serve` computes from its requests' records: latency statistics (ms),
SLO goodput, throughputs, the per-request arrays of the JSON report, and the cost the HTTP
path added to each request against the in-process engine (paired runs)."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np

from raylm.bench.serve_client import RequestOutput


def meets_slos(out: RequestOutput, slos: Dict[str, float]) -> bool:
    """True if `out` succeeded and every given SLO (ms) holds (TPOT of a 1-token reply: 0)."""
    if not out.success:
        return False
    values = {"ttft": out.ttft, "tpot": out.tpot or 0.0, "e2el": out.e2el}
    return all(values[name] is not None and values[name] * 1000 <= limit
               for name, limit in slos.items())


def latency_stats(values_s: Sequence[float],
                  percentiles: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean, median, std and pXX of `values_s`, in milliseconds (None without values)."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    keys = ["mean", "median", "std"] + [f"p{p:g}" for p in percentiles]
    if ms.size == 0:
        return {k: None for k in keys}
    stats = [ms.mean(), np.median(ms), ms.std()] + list(np.percentile(ms, percentiles))
    return {k: float(v) for k, v in zip(keys, stats)}


def compute_metrics(outputs: List[RequestOutput], duration: float, percentiles: Sequence[float],
                    slos: Dict[str, float]) -> dict:
    """Counts, throughputs, goodput (None without SLOs) and latency stats of a run."""
    ok = [o for o in outputs if o.success]
    failed = Counter(o.status_key for o in outputs if not o.success)
    out_tokens = sum(o.output_tokens for o in ok)
    in_tokens = sum(o.prompt_tokens for o in ok)
    good = sum(meets_slos(o, slos) for o in ok) if slos else None
    m = {"completed": len(ok), "failed": sum(failed.values()), "failed_by_status": dict(failed),
         "duration_s": duration, "total_input_tokens": in_tokens,
         "total_output_tokens": out_tokens, "request_throughput": len(ok) / duration,
         "output_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration, "goodput_requests": good,
         "request_goodput": None if good is None else good / duration}
    series = {"ttft": [o.ttft for o in ok], "tpot": [o.tpot for o in ok if o.tpot is not None],
              "itl": [t for o in ok for t in o.itl], "e2el": [o.e2el for o in ok]}
    for name, values in series.items():
        for stat, value in latency_stats(values, percentiles).items():
            m[f"{stat}_{name}_ms"] = value
    return m


def per_request(outputs: List[RequestOutput]) -> dict:
    """Per-request arrays for the JSON report (None where a failed request has no value)."""
    return {"start_s": [o.start for o in outputs],
            "prompt_lens": [o.prompt_tokens for o in outputs],
            "output_lens": [o.output_tokens if o.success else None for o in outputs],
            "expected_output_lens": [o.expected_output_len for o in outputs],
            "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
            "e2els": [o.e2el for o in outputs], "success": [o.success for o in outputs],
            "statuses": [o.status for o in outputs], "errors": [o.error for o in outputs]}


def paired_costs(served: List[RequestOutput], reference: List[RequestOutput], percentiles) -> dict:
    """What the HTTP path added to each request that succeeded both ways (served minus the
    in-process run of the same request, right before or after it): TTFT and TPOT stats, ms."""
    pairs = [(s, r) for s, r in zip(served, reference) if s.success and r.success]
    ttft = [s.ttft - r.ttft for s, r in pairs]
    tpot = [s.tpot - r.tpot for s, r in pairs if s.tpot is not None and r.tpot is not None]
    return {"pairs": len(pairs),
            "reference_ttft_ms": latency_stats([r.ttft for _, r in pairs], percentiles),
            "added_ttft_ms": latency_stats(ttft, percentiles),
            "added_tpot_ms": latency_stats(tpot, percentiles),
            "reference_requests": per_request(reference)}
