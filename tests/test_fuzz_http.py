"""Fuzzing the OpenAI HTTP API (tests/fuzz_http.py) against the tiny-llama app on a real uvicorn
server (no Ray): thousands of generated requests, valid and not, get no 5xx, every well-formed one
a 200, every error OpenAI-shaped, every stream well-formed, and the server is healthy afterwards
with all of its KV blocks free. Without the API key every path but /health, /ping and /version
(not /metrics, since b19c45c) answers 401. RAYLM_FUZZ_SEED picks other seeds.

The fuzz found four server bugs, fixed in 2c1ad26 (minimal reproductions in
tests/test_openai_errors.py); it expects a 400 for each now: a lone surrogate in a prompt (was a
500); echo with a token id < 0 or >= 2**63 (a 500); a streamed prompt batch with a bad later
prompt (200 and an in-band error); stop_token_ids outside the vocabulary with min_tokens > 0
(killed the engine: 503 for every later request).
"""
from __future__ import annotations

import os
from urllib.parse import unquote

from tests.fuzz_http import run_fuzz
from tests.openai_server import API_KEY, srv, wait_all_free  # noqa: F401 (srv: fixture)

SEED = int(os.environ.get("RAYLM_FUZZ_SEED", "0"))
OPEN_PATHS = {"/health", "/ping", "/version"}


def _assert_healthy(srv):
    assert srv.http.get("/health").status_code == 200
    r = srv.http.post("/v1/completions",
                      json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 2})
    assert r.status_code == 200, r.text
    wait_all_free(srv.engine)


def test_fuzz_http_api(srv):
    report = run_fuzz(str(srv.http.base_url), 2000, seed=SEED)
    print(report.summary())
    assert not report.violations, report.summary()
    assert report.requests == 2000
    assert report.count(200, 300) >= 300 and report.count(400, 500) >= 300, report.summary()
    assert report.streamed >= 20, report.summary()
    assert {"completions", "chat", "tokenize", "detokenize", "bad-json", "content-type",
            "deep-json", "wrong-method", "unknown-path", "oversized", "probe",
            "admin"} <= set(report.labels), report.labels
    _assert_healthy(srv)


def test_fuzz_http_api_without_key(srv):
    # no key or a near miss
    report = run_fuzz(srv.auth_url, 300, seed=SEED + 1, api_key=API_KEY, bad_auth=True)
    print(report.summary())
    assert not report.violations, report.summary()
    closed = [(m, p, s) for m, p, s in report.records
              if unquote(p.split("?")[0]) not in OPEN_PATHS]
    assert len(closed) >= 250 and all(s == 401 for _, _, s in closed), [r for r in closed if r[2]
                                                                        != 401][:10]
    _assert_healthy(srv)
