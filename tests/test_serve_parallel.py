"""TP x PP replicas behind `raylm serve`'s app: greedy equals HF through HTTP, and killing
one worker of a replica under load fails that replica's requests with a clear error while
the other replica keeps serving, and Serve brings the replica back."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from raylm.distributed.communicator import free_port

from tests.conftest import hf_greedy, make_tiny_model, random_prompts

pytestmark = pytest.mark.slow

MAX_NEW = 8


def _free_port() -> int:
    return free_port("127.0.0.1")


@pytest.fixture(scope="module")
def app(tiny_root, ray_session):
    from ray import serve

    from raylm.deployments.openai import build_app

    path = make_tiny_model(tiny_root, "llama")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(path), "served_model_name": "tiny", "dtype": "float32",
                         "dp": 2, "tp": 2, "pp": 2, "num_cpus_per_replica": 0.5,
                         "worker_num_cpus": 1, "max_model_len": 256, "num_blocks": 64}),
              name="raylm", route_prefix="/")
    yield path, f"http://127.0.0.1:{port}"
    serve.shutdown()


def _complete(url: str, prompt, max_tokens: int = MAX_NEW) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_tp2_pp2_over_http_equals_hf(app):
    path, url = app
    prompts = random_prompts(4, seed=21)
    expected = hf_greedy(path, prompts, MAX_NEW)
    for prompt, want in zip(prompts, expected):
        assert _complete(url, prompt)["choices"][0]["text"] == _continuation(path, prompt, want)


def test_moe_tp2_pp2_through_serve_handles_equals_hf(app, tiny_root):
    """A second app (Qwen3-MoE, TP=2 x PP=2), called through the Python Serve handle API:
    token ids equal HF's. The app is deleted afterwards, workers and all."""
    from ray import serve

    from raylm.deployments.openai import build_app

    path = make_tiny_model(tiny_root, "qwen3_moe")
    serve.run(build_app({"model": str(path), "dtype": "float32", "tp": 2, "pp": 2,
                         "num_cpus_per_replica": 0.5, "worker_num_cpus": 1, "max_model_len": 256,
                         "num_blocks": 64}),
              name="raylm-moe", route_prefix=None)
    try:
        handle = serve.get_app_handle("raylm-moe")
        prompts = random_prompts(3, seed=22)
        params = {"max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
        got = [handle.generate.remote(p, params).result(timeout_s=120).outputs[0].token_ids
               for p in prompts]
        assert got == hf_greedy(path, prompts, MAX_NEW)
    finally:
        serve.delete("raylm-moe")
    deadline = time.monotonic() + 60
    while len(_alive_workers()) != 8 and time.monotonic() < deadline:  # its 4 workers die with it
        time.sleep(1)
    assert len(_alive_workers()) == 8


def _continuation(path, prompt, output):
    """The text `output` adds after `prompt` (how an incremental detokenizer renders it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.decode(prompt + output,
                      skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


async def _stream(client: httpx.AsyncClient, url: str, prompt, started: asyncio.Event,
                  box: list) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    result = {"tokens": 0, "error": None, "done": False}
    box.append(result)
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                result["done"] = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                result["error"] = obj["error"]
            else:
                result["tokens"] += 1
            if sum(b["tokens"] > 0 for b in box) == len(box) >= 8:
                started.set()
    return result


def _kill_one_worker() -> None:
    import ray

    workers = _alive_workers()
    assert len(workers) == 8, f"expected 2 replicas x 4 workers, found {len(workers)}"
    ray.kill(ray.get_actor(workers[0]["name"], namespace=workers[0]["namespace"]))


@pytest.mark.timeout(300)
def test_killing_a_worker_fails_its_replica_only_and_it_comes_back(app):
    path, url = app

    async def load():
        started, box = asyncio.Event(), []
        async with httpx.AsyncClient(timeout=180) as client:
            tasks = [asyncio.create_task(_stream(client, url, [5 + i, 6, 7, 8], started, box))
                     for i in range(8)]
            await asyncio.wait_for(started.wait(), 120)
            _kill_one_worker()
            return await asyncio.gather(*tasks)

    results = asyncio.run(load())
    failed = [r for r in results if r["error"] is not None]
    ok = [r for r in results if r["error"] is None and r["tokens"] >= 150]
    assert failed and ok, f"expected failures on one replica and successes on the other: {results}"
    # the clear error: a 503 naming the worker that died
    assert all(r["error"]["code"] == "engine_unavailable"
               and "worker rank" in r["error"]["message"] for r in failed), failed
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # Serve replaces the replica whose health check fails
        if len(_alive_workers()) == 8 and _all_succeed(url):
            return
        time.sleep(3)
    pytest.fail("the replica did not come back within 180 s")


def _alive_workers():
    """Every replica's worker actors (named raylm_worker:<group>:<rank>; the GCS drops dead
    ones)."""
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("raylm_worker")]


def _all_succeed(url: str) -> bool:
    try:
        return all(_complete(url, [9, 10, 11], 4)["choices"][0]["text"] is not None
                   for _ in range(6))
    except AssertionError:
        return False
