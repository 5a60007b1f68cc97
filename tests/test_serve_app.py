"""The Serve app end to end: SmolLM2 (fp32) on two DP replicas behind the OpenAI endpoint.

References: the offline LLM API for outputs; Prometheus counters per DP rank for where
requests went; engine block accounting (via /metrics) for disconnects."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from raylm.distributed.communicator import free_port
from tests.waiting import async_wait_for, wait_for

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture(scope="module")
def server(smollm2_path, ray_session):
    from ray import serve

    from raylm.deployments.openai import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model": MODEL, "dtype": "float32", "dp": 2, "max_model_len": 1024,
                     "num_blocks": 256})
    serve.run(app, name="raylm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def offline():
    from raylm import LLM

    return LLM(MODEL, dtype="float32", max_model_len=1024, num_blocks=128)


def _metric(text: str, name: str) -> dict:
    """{dp_rank: value summed over other labels} for one metric in Prometheus text."""
    out: dict = {}
    for line in text.splitlines():
        m = re.match(rf'^raylm:{name}\{{(.*)\}} ([0-9.e+-]+)$', line)
        if m:
            rank = re.search(r'dp_rank="(\d+)"', m.group(1)).group(1)
            out[rank] = out.get(rank, 0.0) + float(m.group(2))
    return out


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def test_openai_client_completes_chats_streams(server, offline):
    from openai import OpenAI

    from raylm import SamplingParams

    client = OpenAI(base_url=f"{server}/v1", api_key="none")
    greedy = SamplingParams(temperature=0, max_tokens=16)
    prompt = "The capital of France is"
    ref_out = offline.generate(prompt, greedy, use_tqdm=False)[0]
    ref = ref_out.outputs[0].text
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert comp.choices[0].text == ref
    assert comp.usage.completion_tokens == len(ref_out.outputs[0].token_ids)
    assert comp.usage.prompt_tokens == len(ref_out.prompt_token_ids)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ref = offline.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                          temperature=0)
    assert chat.choices[0].message.content == chat_ref

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_ref


def test_busy_replica_gets_no_new_request(server):
    """One replica holds a long request; sequential short requests all go to the other."""
    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400,
                    "ignore_eos": True}
            long_req = asyncio.create_task(http.post("/v1/completions", json=body))

            async def load(name):
                return _metric((await http.get("/metrics")).text, name)

            async def busy_rank():  # the coordinator's table shows which rank runs it
                return next((r for r, v in (await load("num_requests_running")).items() if v >= 1),
                            None)

            busy = await async_wait_for(busy_rank, 20, "the long request running on a replica")
            idle = "1" if busy == "0" else "0"

            async def idle_again():
                loads = [await load(n) for n in ("num_requests_running", "num_requests_waiting")]
                return all(m.get(idle, 0) == 0 for m in loads)

            before = await load("request_success_total")
            for _ in range(6):
                r = await http.post("/v1/completions",
                                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 200
                # load reaches routers through the coordinator: wait until the table shows the
                # idle replica idle again, as any later request would see it
                await async_wait_for(idle_again, 10, f"rank {idle} reported idle")
            after = _metric((await http.get("/metrics")).text, "request_success_total")
            assert not long_req.done(), "the long request finished early; the test proves nothing"
            await long_req
            return busy, before, after

    busy, before, after = asyncio.run(main())
    idle = "1" if busy == "0" else "0"
    assert after.get(busy, 0) - before.get(busy, 0) == 0
    assert after.get(idle, 0) - before.get(idle, 0) == 6


def test_burst_spreads_across_replicas(server):
    _wait_idle(server)  # the burst is balanced from equal starting loads
    before = _metric(_metrics(server), "request_success_total")

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            body = {"model": MODEL, "prompt": "Count: one two", "max_tokens": 8,
                    "ignore_eos": True}
            rs = await asyncio.gather(*(http.post("/v1/completions", json=body)
                                        for _ in range(16)))
            assert all(r.status_code == 200 for r in rs)

    asyncio.run(main())
    after = _metric(_metrics(server), "request_success_total")
    got = {r: after.get(r, 0) - before.get(r, 0) for r in ("0", "1")}
    assert sum(got.values()) == 16 and min(got.values()) >= 4, got


def _wait_idle(url: str, timeout_s: float = 30) -> None:
    def idle() -> bool:
        text = _metrics(url)
        return all(v == 0 for name in ("num_requests_running", "num_requests_waiting")
                   for v in _metric(text, name).values())

    wait_for(idle, timeout_s, "the replicas going idle")


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data:")
                if chunks >= 5:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        text = _metrics(server)
        usage, running = (_metric(text, "kv_cache_usage_perc"),
                          _metric(text, "num_requests_running"))
        if usage and all(v == 0 for v in usage.values()) and all(v == 0 for v in running.values()):
            return
        time.sleep(0.5)
    pytest.fail(f"blocks not freed after disconnect: usage={usage} running={running}")


def test_python_handle_from_another_process(server, offline):
    """A separate Python process joins the cluster and calls the app through Serve handles,
    unary and streaming; results equal the offline API."""
    import json
    import subprocess
    import sys

    import ray

    from raylm import SamplingParams

    script = f"""
import asyncio, json, ray
from ray import serve
ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)
async def main():
    h = serve.get_app_handle("raylm")
    params = {{"max_tokens": 12, "temperature": 0}}
    out = await h.generate.remote("The capital of France is", params)
    stream = h.options(stream=True).generate_stream.remote("def add(a, b):", params)
    texts = [o.outputs[0].text async for o in stream]
    print(json.dumps({{"unary": out.outputs[0].text, "stream": texts}}))
asyncio.run(main())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    greedy = SamplingParams(max_tokens=12, temperature=0)
    refs = [o.outputs[0].text
            for o in offline.generate(["The capital of France is", "def add(a, b):"], greedy,
                                      use_tqdm=False)]
    assert got["unary"] == refs[0]
    assert got["stream"][-1] == refs[1] and len(got["stream"]) > 1
    assert all(refs[1].startswith(t) for t in got["stream"])  # cumulative and growing


def test_bad_requests_through_serve_get_4xx_and_serving_continues(server):
    cases = [
        (b"{not json", 400),
        (b'{"model": "%s", "prompt": "x", "temperature": -1}' % MODEL.encode(), 400),
        (b'{"model": "nope", "prompt": "x"}', 404),
        (b'{"model": "%s", "prompt": "x", "n": 0}' % MODEL.encode(), 400),
        (b'{"model": "%s", "prompt": "x", "max_tokens": 99999}' % MODEL.encode(), 400),
        (b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"word " * 2000), 400),
    ]
    with httpx.Client(base_url=server, timeout=60) as http:
        for body, status in cases:
            r = http.post("/v1/completions", content=body,
                          headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:60], r.status_code, r.text[:200])
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_tools_constraints_and_scoring_through_serve(server, offline):
    """Issue 20's surface crosses the ingress -> replica hop: constraints compile in the
    replica (a bad one is a 400 naming its field), prompt logprobs come back, bias applies."""
    from openai import BadRequestError, OpenAI

    from raylm import SamplingParams

    client = OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}}
    out = client.chat.completions.create(model=MODEL,
                                         messages=[{"role": "user",
                                                    "content": "Weather in Oslo?"}], tools=[tool],
                                         tool_choice="required", max_tokens=40, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                  extra_body={"guided_regex": "[a-"})
    assert err.value.body["param"] == "guided_regex"
    prompt = "The capital of France is"
    scored = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1,
                                       max_tokens=0)
    ref = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
    expected = [p[t].logprob for p, t in zip(ref.prompt_logprobs[1:], ref.prompt_token_ids[1:])]
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={"42": 100})
    assert forced.choices[0].text == offline.get_tokenizer().decode([42] * 3)


def test_metrics_reach_ray_metrics_export(server):
    """The replicas' ray.util.metrics (what the Ray dashboard shows) appear on the node's
    Prometheus export, labelled by DP rank, after some traffic: every series the Grafana
    dashboard reads that one request touches, the engine gauges and counters included."""
    import ray

    node = ray.nodes()[0]
    export = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    from tests.test_grafana_dashboard import dashboard_series

    # the Grafana dashboard's series (its Ray-export flavour) that one request touches
    touched = {n for n in dashboard_series("ray_raylm_") if "preemptions" not in n
               and "cache_hits" not in n}
    exported = set()
    httpx.post(f"{server}/v1/completions",
               json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}, timeout=60)
    deadline = time.time() + 90  # Ray exports on a period (several seconds)
    while time.time() < deadline:
        try:
            text = httpx.get(export, timeout=10).text
        except httpx.HTTPError:
            text = ""
        lines = [l for l in text.splitlines() if l.startswith("ray_raylm_generation_tokens")]
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line.startswith("ray_raylm_")}
        if any('dp_rank="' in l for l in lines) and touched <= exported:
            return
        time.sleep(3)
    pytest.fail(f"not every raylm metric on {export}; missing: {sorted(touched - exported)}")
