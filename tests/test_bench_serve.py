"""`raylm bench serve` against a fake OpenAI streaming server with known timing (no Ray, no
model): the measured TTFT / ITL must match the delays the server sleeps, token counts must
match what it sent, and arrivals, concurrency caps, failures and goodput must be counted
as specified. These check the measurement, not raylm's speed."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request  # at module level: the handler's annotations are strings
from fastapi.responses import JSONResponse, StreamingResponse

from raylm.bench import serve, serve_metrics
from raylm.bench.serve_client import RequestOutput, SSEDecoder

FIRST_DELAY = 0.05  # seconds before the first token chunk
GAP = 0.01  # seconds between later token chunks


class FakeOpenAI:
    """A FastAPI app that streams `max_tokens` one-word chunks: the first after FIRST_DELAY,
    then one every GAP; counts requests in flight; answers the statuses in `fail_plan` first."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, usage: bool = True, fail_plan=()) -> None:
        self.usage, self.fail_plan = usage, list(fail_plan)
        self.in_flight = self.max_in_flight = 0
        self.bodies = []

    def app(self):
        app = FastAPI()

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if self.fail_plan:
                status = self.fail_plan.pop(0)
                return JSONResponse({"error": {"message": f"fake {status}"}}, status_code=status)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return StreamingResponse(self.stream(body), media_type="text/event-stream")

        return app

    async def stream(self, body: dict):
        chat = "messages" in body
        try:
            if chat:  # a role-only chunk first, as OpenAI sends: it carries no token
                yield _sse({"choices": [{"index": 0,
                                         "delta": {"role": "assistant", "content": ""}}]})
            for i in range(body["max_tokens"]):
                await asyncio.sleep(FIRST_DELAY if i == 0 else GAP)
                choice = ({"index": 0, "delta": {"content": f" w{i}"}} if chat
                          else {"index": 0, "text": f" w{i}"})
                yield _sse({"choices": [choice]})
            if self.usage and body.get("stream_options", {}).get("include_usage"):
                prompt = body["messages"][0]["content"] if chat else body["prompt"]
                yield _sse({"choices": [], "usage": {"prompt_tokens": len(prompt.split()),
                                                     "completion_tokens": body["max_tokens"]}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    fake = FakeOpenAI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    _warm_up(fake.url)
    yield fake
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _warm_up(url: str) -> None:
    """One request before the tests, so the first timed one does not pay the app's cold start."""
    import urllib.request

    body = json.dumps({"model": "m", "prompt": "w1", "max_tokens": 1, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert b"[DONE]" in resp.read()


def _args(tokenizer_dir, base_url: str, *extra: str):
    from raylm.cli import build_parser

    argv = ["bench", "serve", "--base-url", base_url, "--model", "fake-model", "--tokenizer",
            str(tokenizer_dir), "--disable-tqdm", "--fixed-input-len", "16", "--fixed-output-len",
            "6", "--num-prompts", "8", "--timeout", "20", *extra]
    return build_parser().parse_args(argv)


def _run(fake, tiny_llama, *extra: str, usage: bool = True, fail_plan=()) -> dict:
    fake.reset(usage=usage, fail_plan=fail_plan)
    return asyncio.run(serve.benchmark(_args(tiny_llama, fake.url, *extra)))


def test_completions_timing_and_counts(fake_server, tiny_llama, tmp_path, capsys):
    out_json = tmp_path / "serve.json"
    fake_server.reset()
    assert serve.cmd_serve(_args(tiny_llama, fake_server.url, "--output-json", str(out_json))) == 0
    assert "TTFT ms" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    r, reqs = report["results"], report["requests"]
    assert r["completed"] == 8 and r["failed"] == 0
    assert reqs["output_lens"] == [6] * 8 and r["total_output_tokens"] == 48
    assert reqs["prompt_lens"] == [16] * 8  # the server's count of prompt words
    assert all(len(itl) == 5 for itl in reqs["itls"])
    # Bounds are generous (a loaded 2-core box); the lower ones are the sharp checks: a
    # token can't be seen before the server sleeps FIRST_DELAY, nor the next before GAP.
    assert all(FIRST_DELAY * 0.9 <= t <= FIRST_DELAY + 0.5 for t in reqs["ttfts"])
    assert 45 <= r["median_ttft_ms"] <= 300
    assert 7 <= r["median_itl_ms"] <= 40 and 7 <= r["median_tpot_ms"] <= 40
    assert all(5 * GAP * 0.9 <= e - t <= 0.3 for e, t in zip(reqs["e2els"], reqs["ttfts"]))
    # inf rate: all at once
    assert r["goodput_requests"] is None and fake_server.max_in_flight == 8
    # the client's own CPU over the run (it shares the server's cores)
    assert r["client_cpu_s"] > 0
    assert report["args"]["request_rate"] == "inf" and "api_key" not in report["args"]
    body = fake_server.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 6 and body["stream"] is True
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True} and len(body["prompt"].split()) == 16


def test_chat_without_usage_counts_chunks(fake_server, tiny_llama):
    report = _run(fake_server, tiny_llama, "--endpoint", "/v1/chat/completions", "--goodput",
                  "ttft:5000", usage=False)
    r, reqs = report["results"], report["requests"]
    assert r["completed"] == 8 and reqs["output_lens"] == [6] * 8
    assert all(t >= FIRST_DELAY * 0.9 for t in reqs["ttfts"])  # the role-only chunk is no token
    assert r["goodput_requests"] == 8
    assert "messages" in fake_server.bodies[0] and "prompt" not in fake_server.bodies[0]


def test_max_concurrency_is_respected(fake_server, tiny_llama):
    report = _run(fake_server, tiny_llama, "--num-prompts", "12", "--max-concurrency", "3")
    assert report["results"]["completed"] == 12
    assert fake_server.max_in_flight == 3


def test_request_rate_schedules_sends(fake_server, tiny_llama):
    report = _run(fake_server, tiny_llama, "--num-prompts", "10", "--request-rate", "20", "--seed",
                  "3")
    expected = serve.send_offsets(10, 20.0, 1.0, 3)
    starts = np.asarray(report["requests"]["start_s"])
    assert expected[-1] > 0.1  # the schedule is spread out, so this checks something
    # late by at most 0.15 s (a busy 2-core box); sending serially would drift by seconds
    assert np.all(starts >= expected - 1e-3) and np.all(starts <= expected + 0.15)


def test_failures_are_counted_by_status(fake_server, tiny_llama):
    report = _run(fake_server, tiny_llama, "--num-prompts", "10", fail_plan=[429, 500, 500])
    r = report["results"]
    assert r["completed"] == 7 and r["failed"] == 3
    assert r["failed_by_status"] == {"429": 1, "500": 2}
    assert r["total_output_tokens"] == 7 * 6
    assert sum("fake 500" in e for e in report["requests"]["errors"]) == 2


def test_unreachable_server_fails_every_request(tiny_llama):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = asyncio.run(serve.benchmark(_args(tiny_llama, f"http://127.0.0.1:{port}",
                                               "--num-prompts", "3")))
    assert report["results"]["completed"] == 0
    assert report["results"]["failed_by_status"] == {"no-response": 3}


def test_arrival_intervals_mean_and_burstiness():
    rate = 4.0
    cv2 = {}
    for shape in [0.25, 1.0, 4.0]:
        gaps = serve.arrival_intervals(2000, rate, shape, seed=0)
        tolerance = 0.05 if shape >= 1 else 0.12
        assert abs(gaps.mean() - 1 / rate) <= tolerance / rate
        cv2[shape] = gaps.var() / gaps.mean() ** 2  # gamma: 1 / shape
    assert 2.8 <= cv2[0.25] <= 5.2 and 0.8 <= cv2[1.0] <= 1.2 and 0.2 <= cv2[4.0] <= 0.3
    assert np.array_equal(serve.arrival_intervals(50, rate, 1.0, seed=7),
                          serve.arrival_intervals(50, rate, 1.0, seed=7))
    assert not serve.arrival_intervals(5, float("inf")).any()
    offsets = serve.send_offsets(4, 2.0, 1.0, seed=1)
    assert offsets[0] == 0 and np.allclose(np.diff(offsets),
                                           serve.arrival_intervals(4, 2.0, 1.0, seed=1)[:3])


def _rec(ttft, e2el, tokens, success=True, status=200):
    return RequestOutput(prompt_len=10, success=success, status=status, ttft=ttft, e2el=e2el,
                         chunks=tokens)


def test_goodput_on_hand_made_records():
    records = [_rec(0.05, 0.95, 10),   # ttft 50 ms, tpot 100 ms, e2el 950 ms
               _rec(0.20, 0.56, 10),   # ttft 200 ms, tpot 40 ms
               _rec(0.08, 0.35, 10),   # ttft 80 ms, tpot 30 ms, e2el 350 ms
               _rec(0.01, 0.01, 1),    # a single token: no TPOT
               _rec(None, None, 0, success=False, status=500)]
    slos = {"ttft": 100.0, "tpot": 50.0}
    met = [serve_metrics.meets_slos(o, slos) for o in records]
    assert met == [False, False, True, True, False]
    m = serve_metrics.compute_metrics(records, 2.0, [50, 90], slos)
    assert m["goodput_requests"] == 2 and m["request_goodput"] == pytest.approx(1.0)
    assert m["completed"] == 4 and m["failed_by_status"] == {"500": 1}
    assert m["total_output_tokens"] == 31 and m["output_throughput"] == pytest.approx(15.5)
    assert m["total_token_throughput"] == pytest.approx((40 + 31) / 2.0)
    assert m["mean_ttft_ms"] == pytest.approx(85.0) and m["median_ttft_ms"] == pytest.approx(65.0)
    assert m["mean_tpot_ms"] == pytest.approx((100 + 40 + 30) / 3)
    e2el_only = serve_metrics.compute_metrics(records, 2.0, [50], {"e2el": 400})
    assert e2el_only["goodput_requests"] == 2


def test_sse_decoder_splits_and_joins():
    stream = (b': comment\n\ndata: {"a": 1}\n\ndata: {"b":\r\n\r\ndata: x\r\ndata: y\r\n\r\n'
              b"data:z\rdata: w\r\rda" + "ta: \u00e9\n\ndata: [DONE]\n\n".encode())
    for size in range(1, len(stream) + 1):  # every way of cutting the stream into equal reads
        dec = SSEDecoder()
        payloads = [p for i in range(0, len(stream), size) for p in dec.feed(stream[i:i + size])]
        assert payloads == ['{"a": 1}', '{"b":', "x\ny", "z\nw", "\u00e9", "[DONE]"], size


def test_option_parsing():
    assert serve.parse_goodput(["ttft:500", "e2el:1e4"]) == {"ttft": 500.0, "e2el": 10000.0}
    assert serve.parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    for bad in (["itl:5"], ["ttft"], ["tpot:0"]):
        with pytest.raises(ValueError):
            serve.parse_goodput(bad)
    with pytest.raises(ValueError):
        serve.parse_percentiles("0,50")


def test_inprocess_backend_runs_the_same_workload(tiny_llama):
    """--backend inprocess: the same requests through an AsyncEngine, timed the same way."""
    from raylm.cli import build_parser

    args = build_parser().parse_args([
        "bench", "serve", "--backend", "inprocess", "--model", str(tiny_llama), "--dtype",
        "float32", "--max-model-len", "128", "--kv-cache-memory", "4MiB", "--disable-tqdm",
        "--fixed-input-len", "16", "--fixed-output-len", "6", "--num-prompts", "6",
        "--max-concurrency", "2"])
    report = asyncio.run(serve.benchmark(args))
    r, reqs = report["results"], report["requests"]
    assert report["backend"] == "inprocess" and report["base_url"] is None
    assert r["completed"] == 6 and r["failed"] == 0
    assert reqs["output_lens"] == [6] * 6 and reqs["prompt_lens"] == [16] * 6
    assert all(t is not None and t > 0 for t in reqs["ttfts"])
    assert all(e >= t for e, t in zip(reqs["e2els"], reqs["ttfts"]))


def test_alternating_with_inprocess_pairs_each_request(fake_server, tiny_llama):
    """--alternate-inprocess: request i runs in-process and over HTTP back to back (even i
    in-process first, odd HTTP first), and the added TTFT/TPOT are the per-request
    differences of those pairs."""
    fake_server.reset()
    report = asyncio.run(serve.benchmark(_args(
        tiny_llama, fake_server.url, "--alternate-inprocess", "--max-concurrency", "1", "--model",
        str(tiny_llama), "--dtype", "float32",
        "--max-model-len", "128", "--kv-cache-memory", "4MiB")))
    served, ref, paired = (report["requests"], report["paired"]["reference_requests"],
                           report["paired"])
    assert paired["pairs"] == 8 and len(fake_server.bodies) == 8 and fake_server.max_in_flight == 1
    assert ref["output_lens"] == served["output_lens"] == [6] * 8
    assert [r < s for r, s in zip(ref["start_s"], served["start_s"])] == [True, False] * 4
    added = np.subtract(served["ttfts"], ref["ttfts"]) * 1000
    assert paired["added_ttft_ms"]["median"] == pytest.approx(float(np.median(added)))
    assert paired["added_ttft_ms"]["mean"] == pytest.approx(float(np.mean(added)))
    with pytest.raises(ValueError, match="--max-concurrency 1"):
        asyncio.run(serve.benchmark(_args(tiny_llama, fake_server.url, "--alternate-inprocess")))
