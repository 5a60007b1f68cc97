"""The admin routes' guard, in process (no Ray): the OpenAI app with the elastic-scaling routes
over a stub scaler that records what reaches it. Without an admin key the routes do not exist
(404, like any unknown path); with one, only that key opens them (not the inference key, not a
near miss), and it opens nothing else. References: the stub's record of calls, the app's own
404 for an unknown path."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.responses import JSONResponse

from raylm.serve.elastic import ScaleRequest, add_elastic_routes

KEY, ADMIN = "sk-inference-1b2c3d", "sk-admin-9f8e7d6c"


class StubScaler:
    guarding = False

    def __init__(self) -> None:
        self.calls = []

    async def scale(self, req: ScaleRequest) -> JSONResponse:
        self.calls.append(req.new_data_parallel_size)
        return JSONResponse({"new_data_parallel_size": req.new_data_parallel_size})

    def status(self):
        return {"is_scaling_elastic_ep": False, "progress": None}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from raylm.config import CacheConfig, EngineConfig, ModelConfig
    from raylm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                                        max_model_len=128),
                                      cache=CacheConfig(num_blocks=16)))
    yield engine
    engine.shutdown()


def _app(engine, admin_api_key):
    from raylm.serve.engine_client import LocalEngineClient
    from raylm.serve.openai_app import create_app

    scaler = StubScaler()
    app = create_app(LocalEngineClient(engine, "tiny"), api_key=KEY, admin_api_key=admin_api_key)
    if admin_api_key:  # as the Serve ingress does
        add_elastic_routes(app, scaler)
    return app, scaler


def _calls(app, requests):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                     timeout=30) as http:
            return [await http.request(m, p, json=body, headers=h) for m, p, body, h in requests]

    return asyncio.run(main())


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


SCALE = ("POST", "/scale_elastic_ep", {"new_data_parallel_size": 2})
STATUS = ("POST", "/is_scaling_elastic_ep", None)


def test_without_an_admin_key_the_routes_do_not_exist(engine):
    app, scaler = _app(engine, admin_api_key=None)
    for headers in ({}, _bearer(KEY), _bearer(ADMIN), _bearer("")):
        unknown = _calls(app,
                         [("POST", "/no_such_route", {"new_data_parallel_size": 2}, headers)])[0]
        assert unknown.status_code in (401, 404)
        for r in _calls(app, [(m, p, b, headers) for m, p, b in (SCALE, STATUS)]):
            assert (r.status_code, r.json()) == (unknown.status_code, unknown.json()), r.text
    assert scaler.calls == []


def test_only_the_admin_key_opens_the_admin_routes(engine):
    app, scaler = _app(engine, admin_api_key=ADMIN)
    bad = [{}, _bearer(KEY), _bearer("wrong"), _bearer(ADMIN + "x"), _bearer(ADMIN[:-1]),
           _bearer(ADMIN.upper()), {"Authorization": ADMIN}, {"Authorization": f"Basic {ADMIN}"},
           {"X-API-Key": ADMIN}]
    refused = _calls(app, [(m, p, b, h) for m, p, b in (SCALE, STATUS) for h in bad])
    for r in refused:
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert ADMIN not in r.text and KEY not in r.text
    assert scaler.calls == []
    ok = _calls(app, [(*SCALE, _bearer(ADMIN)), (*STATUS, _bearer(ADMIN))])
    assert [r.status_code for r in ok] == [200, 200] and scaler.calls == [2]
    assert ok[1].json() == {"is_scaling_elastic_ep": False, "progress": None}
    # the admin key is not an inference key, and the inference key still works where it belongs
    models = _calls(app,
                    [("GET", "/v1/models", None, _bearer(ADMIN)),
                     ("GET", "/v1/models", None, _bearer(KEY))])
    assert [r.status_code for r in models] == [401, 200]


def test_scale_bodies_are_validated_strictly(engine):
    app, scaler = _app(engine, admin_api_key=ADMIN)
    bodies = [{"new_data_parallel_size": v} for v in (0, -1, "2", 2.0, True, None, [2])]
    bodies += [{}, {"new_data_parallel_size": 2, "timeout": 0},
               {"new_data_parallel_size": 2, "extra": 1}]
    for r in _calls(app, [("POST", "/scale_elastic_ep", b, _bearer(ADMIN)) for b in bodies]):
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert scaler.calls == []
