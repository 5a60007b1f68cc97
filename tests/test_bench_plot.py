"""`raylm bench plot`: reports grouped by label into series against request rate (checked by
hand), and the PNGs written."""
import json

import pytest

from raylm.bench.plot import load, plot, rate_of, series


def _report(label, rate, p50, p99, goodput=None, throughput=1.0, trace=None):
    args = {"request_rate": rate, "trace": trace, "trace_time_scale": 4.0}
    results = {"median_ttft_ms": p50, "p99_ttft_ms": p99, "median_itl_ms": p50 / 10,
               "p99_itl_ms": p99 / 10, "request_goodput": goodput,
               "request_throughput": throughput}
    return {"benchmark": "serve", "label": label, "args": args, "results": results}


def test_series_by_label_sorted_by_rate():
    reports = [_report("prefix_aware", 4.0, 30, 90, goodput=3.5),
               _report("least_loaded", 2.0, 20, 40),
               _report("prefix_aware", 2.0, 10, 20, goodput=2.0),
               _report("least_loaded", 4.0, 50, 300)]
    data = series(reports)
    assert data["prefix_aware"]["median_ttft_ms"] == [(2.0, 10.0), (4.0, 30.0)]
    assert data["least_loaded"]["p99_ttft_ms"] == [(2.0, 40.0), (4.0, 300.0)]
    assert data["prefix_aware"]["goodput"] == [(2.0, 2.0), (4.0, 3.5)]
    # no SLOs: request throughput
    assert data["least_loaded"]["goodput"] == [(2.0, 1.0), (4.0, 1.0)]


def test_the_rate_axis():
    assert rate_of(_report("a", 3.0, 1, 1)) == 3.0
    assert rate_of(_report("a", "inf", 1, 1, trace="t.csv")) == 4.0  # a replay: its time scale
    with pytest.raises(ValueError, match="infinite request rate"):
        rate_of(_report("a", "inf", 1, 1))


def test_pngs_are_written(tmp_path):
    paths = []
    for i, (label, rate) in enumerate([("a", 1.0), ("a", 2.0), ("b", 1.0)]):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(_report(label, rate, 10 * (i + 1), 30 * (i + 1))))
        paths.append(str(path))
    written = plot(series(load(paths)), str(tmp_path / "plots"), "t", "request rate")
    assert [p.rsplit("/", 1)[1] for p in written] == ["ttft.png", "itl.png", "goodput.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_other_reports_are_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmark": "throughput"}))
    with pytest.raises(ValueError, match="not a `raylm bench serve` report"):
        load([str(path)])


def test_queue_depth_samples_become_a_heat_map(tmp_path):
    """--sample-queues scrapes (parsed from a real Prometheus exposition) -> per-rank rows of
    waiting + running, nan where a rank was not scraped yet -> queues_<level>.png."""
    import math

    from raylm.bench.plot import plot_queues, queue_matrix
    from raylm.bench.queues import QueueSampler, parse_queues

    text = ('# TYPE raylm:num_requests_waiting gauge\n'
            'raylm:num_requests_waiting{dp_rank="0",model_name="m"} 2.0\n'
            'raylm:num_requests_waiting{dp_rank="1",model_name="m"} 0.0\n'
            '# TYPE raylm:num_requests_running gauge\n'
            'raylm:num_requests_running{dp_rank="0",model_name="m"} 3.0\n'
            'raylm:num_requests_running{dp_rank="1",model_name="m"} 1.0\n'
            '# TYPE raylm:e2e_request_latency_seconds histogram\n'
            'raylm:e2e_request_latency_seconds_count{dp_rank="0"} 5.0\n')
    assert parse_queues(text) == {"waiting": {"0": 2.0, "1": 0.0}, "running": {"0": 3.0, "1": 1.0}}
    sampler = QueueSampler("http://x", {}, 0.5)
    sampler.add(0.0, {"waiting": {"0": 1.0}, "running": {"0": 0.0}})
    sampler.add(0.5, parse_queues(text))
    report = {**_report("a", 2.0, 1, 1), "queue_depth": sampler.report()}
    t, ranks, rows = queue_matrix(report)
    assert (t, ranks) == ([0.0, 0.5], ["0", "1"])
    assert rows[0] == [1.0, 5.0] and math.isnan(rows[1][0]) and rows[1][1] == 1.0
    written = plot_queues([report, _report("b", 2.0, 1, 1)], str(tmp_path), "t")
    assert [p.rsplit("/", 1)[1] for p in written] == ["queues_2.png"]
