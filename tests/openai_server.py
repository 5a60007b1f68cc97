"""A tiny-llama AsyncEngine behind the OpenAI app on real uvicorn servers (no Ray), shared by
the OpenAI HTTP tests: `srv` serves a plain app and one with an API key on one event loop."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

try:
    import httpx2 as httpx  # what openai>=3 and starlette's TestClient use
except ImportError:  # pragma: no cover
    import httpx

import uvicorn

from raylm.config import CacheConfig, EngineConfig, ModelConfig
from raylm.engine.async_engine import AsyncEngine
from raylm.serve.engine_client import LocalEngineClient
from raylm.serve.openai_app import create_app

API_KEY = "sk-test-secret"
# Renders [{"role": "user", "content": "w5 w6"}] as "w1 w5 w6 w2" -> ids [4, 8, 9, 5].
TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w2{% endif %}")


def word_ids(*ks):
    return [k + 3 for k in ks]


class RecordingClient(LocalEngineClient):
    """Notes the requests whose output stream was closed before they finished (aborted)."""

    def __init__(self, engine, name):
        super().__init__(engine, name)
        self.closed_early = []

    def generate(self, prompt_token_ids, params, request_id):
        inner = super().generate(prompt_token_ids, params, request_id)

        async def recorded():
            finished = False
            try:
                async for out in inner:
                    finished = out.finished
                    yield out
            finally:
                await inner.aclose()
                if not finished:
                    self.closed_early.append(request_id)

        return recorded()


async def _serve_all(servers):
    await asyncio.gather(*(s.serve() for s in servers))


@pytest.fixture(scope="module")
def srv(tiny_llama):
    config = EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                            max_model_len=128),
                          cache=CacheConfig(num_blocks=64))
    yield from serving(config, "tiny", ["tiny-alias"], TEMPLATE)


def serving(config, name, aliases=(), template=None, **app_kwargs):
    """An AsyncEngine behind two OpenAI apps on uvicorn (the second with API_KEY); yields
    what the tests use of them and stops the servers after."""
    engine = AsyncEngine(config)
    if template is not None:
        engine.tokenizer.chat_template = template
    client = RecordingClient(engine, name)
    apps = [create_app(client, served_model_names=list(aliases), **app_kwargs),
            create_app(client, api_key=API_KEY, **app_kwargs)]
    servers = [uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                             lifespan="off"))
               for app in apps]
    thread = threading.Thread(target=asyncio.run, args=(_serve_all(servers),), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not all(s.started for s in servers):
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    ports = [s.servers[0].sockets[0].getsockname()[1] for s in servers]
    with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as http:
        yield SimpleNamespace(engine=engine, client=client, http=http,
                              auth_url=f"http://127.0.0.1:{ports[1]}")
    for s in servers:
        s.should_exit = True
    thread.join(timeout=10)


def wait_all_free(engine, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        stats = engine.stats()
        if (stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
                and stats.num_waiting == 0):
            return
        assert time.time() < deadline, f"KV blocks not freed: {stats}"
        time.sleep(0.05)


def sse_events(response):
    """Parsed `data:` payloads of an SSE response; the final [DONE] as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def post_stream(http, path, body):
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def whole_and_stream(http, path, body):
    """`body` answered whole and streamed (with a usage event): (whole response, the chunks,
    the usage event); the stream must end with [DONE]."""
    whole = http.post(path, json=body).json()
    events = post_stream(http, path, {**body, "stream": True,
                                      "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    return whole, events[:-2], events[-2]


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err
