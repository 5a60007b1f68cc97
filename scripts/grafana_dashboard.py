"""Writes deployments/grafana/raylm-dashboard.json: a Grafana dashboard over raylm's serving
metrics. A `prefix` variable picks the source: `raylm:` for the app's own /metrics (what
vLLM's names look like), `ray_raylm_` for Ray's metrics export (the Ray dashboard's
Prometheus). Usage: python scripts/grafana_dashboard.py [OUT]"""
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deployments" / "grafana" / "raylm-dashboard.json"
P = "${prefix}"


def quantiles(metric: str) -> list:
    series = f"{P}{metric}_bucket{{model_name=~\"$model\"}}"
    return [(f"histogram_quantile({x}, sum by (le) (rate({series}[$__rate_interval])))",
             f"p{round(x * 100)}")
            for x in (0.5, 0.9, 0.99)]


def by_rank(metric: str) -> list:
    return [(f"sum by (dp_rank) ({P}{metric}{{model_name=~\"$model\"}})", "rank {{dp_rank}}")]


def rate(metric: str, legend: str, by: str = "") -> tuple:
    group = f" by ({by})" if by else ""
    return (f"sum{group} (rate({P}{metric}{{model_name=~\"$model\"}}[$__rate_interval]))", legend)


PANELS = [  # (title, unit, [(expr, legend)])
    ("Requests finished /s", "reqps",
     [rate("request_success_total", "{{finished_reason}}", "finished_reason")]),
    ("Tokens /s", "short",
     [rate("prompt_tokens_total", "prompt"), rate("generation_tokens_total", "generated")]),
    ("Time to first token", "s", quantiles("time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("inter_token_latency_seconds")),
    ("End-to-end request latency", "s", quantiles("e2e_request_latency_seconds")),
    ("Requests running, per DP rank", "short", by_rank("num_requests_running")),
    ("Requests waiting, per DP rank", "short", by_rank("num_requests_waiting")),
    ("KV cache usage, per DP rank", "percentunit", by_rank("kv_cache_usage_perc")),
    ("Prefix cache hit rate", "percentunit",
     [(f"sum(rate({P}prefix_cache_hits_total[$__rate_interval])) / "
       f"sum(rate({P}prefix_cache_queries_total[$__rate_interval]))", "hits / queries")]),
    ("Preemptions /s", "short", [rate("num_preemptions_total", "preemptions")]),
]


def panel(i: int, title: str, unit: str, targets: list) -> dict:
    return {"id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)]}


def dashboard() -> dict:
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "prefix", "type": "custom", "label": "metrics from", "query": "raylm:,ray_raylm_",
         "current": {"text": "raylm:", "value": "raylm:"},
         "options": [{"text": v, "value": v, "selected": v == "raylm:"}
                     for v in ("raylm:", "ray_raylm_")]},
        {"name": "model", "type": "query", "label": "model",
         "datasource": {"uid": "${datasource}"},
         "query": f"label_values({P}num_requests_running, model_name)", "includeAll": True,
         "multi": True, "refresh": 2},
    ]
    return {"title": "raylm", "uid": "raylm-serving", "schemaVersion": 39,
            "tags": ["raylm", "llm", "ray"], "time": {"from": "now-1h", "to": "now"},
            "refresh": "10s", "templating": {"list": variables},
            "panels": [panel(i, *p) for i, p in enumerate(PANELS)]}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {out}")
