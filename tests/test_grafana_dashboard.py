"""deployments/grafana/raylm-dashboard.json: what scripts/grafana_dashboard.py writes, and every
series its queries read is one raylm's metrics sink really exports (the app's /metrics,
rendered by prometheus-client here; Ray's export is checked in tests/test_serve_app.py)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deployments" / "grafana" / "raylm-dashboard.json"


def _generator():
    spec = importlib.util.spec_from_file_location("grafana_dashboard",
                                                  ROOT / "scripts" / "grafana_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_series(prefix: str) -> set:
    """Series names the dashboard's queries read, with the `prefix` variable filled in."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\$\{prefix\}(\w+)", expr))
    return {prefix + n for n in names}


def test_the_committed_dashboard_is_the_generators_output():
    assert json.loads(DASHBOARD.read_text()) == _generator().dashboard()


def test_every_series_the_dashboard_reads_is_exported_by_the_apps_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from raylm.serve.metrics import COUNTERS, GAUGES, HISTOGRAMS, PromSink

    sink, tags = PromSink(), {"model_name": "m", "dp_rank": "0"}
    for name in HISTOGRAMS:
        sink.observe(name, 0.1, tags)
    for name in COUNTERS:
        sink.inc(name, 1,
                 {**tags, "finished_reason": "stop"} if name == "request_success_total" else tags)
    for name in GAUGES:
        sink.set(name, 1, tags)
    exported = {s.name for f in text_string_to_metric_families(sink.render().decode())
                for s in f.samples}
    wanted = dashboard_series("raylm:")
    assert len(wanted) >= 10 and wanted <= exported, sorted(wanted - exported)
