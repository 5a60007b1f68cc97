"""The OpenAI HTTP layer under bad input and failure: every bad request gets the right 4xx
in OpenAI's error shape (never a 5xx) and the server keeps serving; API key and body limits;
client disconnects abort their requests and free every KV block; engine failures map to
503/429/500 in OpenAI shape."""
from __future__ import annotations

import json
import time

import pytest

from raylm.serve.openai_app import create_app
from tests.openai_server import (API_KEY, assert_openai_error, httpx, srv,
                                 wait_all_free)  # noqa: F401 (srv)

# ---- bad requests -----------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 2}
MSGS = [{"role": "user", "content": "w5"}]

BAD_REQUESTS = [  # (id, path, body (dict or raw bytes), status, param)
    ("malformed-json", C, b'{"model": "tiny", "prompt": ', 400, None),
    ("not-an-object", C, b"[1, 2]", 400, None),
    ("missing-prompt", C, {"model": "tiny"}, 400, "prompt"),
    ("prompt-wrong-type", C, {**OK, "prompt": 5}, 400, "prompt"),
    ("max-tokens-string", C, {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("stream-string", C, {**OK, "stream": "yes"}, 400, "stream"),
    ("temperature-negative", C, {**OK, "temperature": -1}, 400, "temperature"),
    ("top-p-2", C, {**OK, "top_p": 2}, 400, "top_p"),
    ("n-0", C, {**OK, "n": 0}, 400, "n"),
    ("max-tokens-0", C, {**OK, "max_tokens": 0}, 400, "max_tokens"),  # only with echo
    ("max-tokens-over-context", C, {**OK, "max_tokens": 200}, 400, "max_tokens"),
    ("prompt-over-context", C, {**OK, "prompt": [5] * 130}, 400, "prompt"),
    ("prompt-fills-context", C, {**OK, "prompt": [5] * 128, "max_tokens": None}, 400, "prompt"),
    ("empty-prompt", C, {**OK, "prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", C, {**OK, "prompt": []}, 400, "prompt"),
    ("empty-prompt-in-batch", C, {**OK, "prompt": ["w5", ""]}, 400, "prompt"),
    ("token-out-of-vocab", C, {**OK, "prompt": [3, 99999]}, 400, "prompt"),
    ("token-out-of-vocab-stream", C, {**OK, "prompt": [3, 99999], "stream": True}, 400, "prompt"),
    # found by the fuzz (tests/fuzz_http.py): each was a 500, or killed the engine
    ("lone-surrogate", C, b'{"model": "tiny", "prompt": "w5 \\ud800", "max_tokens": 2}', 400,
     "prompt"),
    ("tokenize-lone-surrogate", "/tokenize", b'{"model": "tiny", "prompt": "\\udfff"}', 400,
     "prompt"),
    ("echo-negative-token", C, {**OK, "prompt": [5, -1], "echo": True}, 400, "prompt"),
    ("echo-huge-token", C, {**OK, "prompt": [5, 2 ** 63], "echo": True}, 400, "prompt"),
    ("batch-stream-late-bad-prompt", C, {**OK, "prompt": [[5, 6], [5, 99999]], "stream": True},
     400, "prompt"),
    ("stop-token-out-of-vocab", C, {**OK, "stop_token_ids": [99999], "min_tokens": 1}, 400,
     "stop_token_ids"),
    ("logprobs-50", C, {**OK, "logprobs": 50}, 400, "logprobs"),
    ("stop-empty", C, {**OK, "stop": [""]}, 400, "stop"),
    ("min-over-max", C, {**OK, "min_tokens": 5}, 400, "min_tokens"),
    ("stream-options-without-stream", C, {**OK, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("logit-bias-key", C, {**OK, "logit_bias": {"w5": 1.0}}, 400, "logit_bias"),
    ("logit-bias-value", C, {**OK, "logit_bias": {"5": -101}}, 400, "logit_bias"),
    ("logit-bias-out-of-vocab", C, {**OK, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("prompt-logprobs-stream", C, {**OK, "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs"),
    ("prompt-logprobs-21", CHAT, {"model": "tiny", "messages": MSGS, "prompt_logprobs": 21}, 400,
     "prompt_logprobs"),
    ("unknown-model", C, {**OK, "model": "gpt-9"}, 404, "model"),
    ("chat-no-messages", CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    ("chat-bad-role", CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "w5"}]},
     400, "messages"),
    ("chat-image-part", CHAT, {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ("chat-temperature-string", CHAT, {"model": "tiny", "messages": MSGS, "temperature": "hot"},
     400, "temperature"),
    ("chat-top-logprobs-alone", CHAT, {"model": "tiny", "messages": MSGS, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat-tools", CHAT, {"model": "tiny", "messages": MSGS, "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("chat-unknown-model", CHAT, {"model": "nope", "messages": MSGS}, 404, "model"),
    ("chat-max-completion-over-context", CHAT, {"model": "tiny", "messages": MSGS,
                                                "max_completion_tokens": 500}, 400, "max_tokens"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens"),
    ("tokenize-neither", "/tokenize", {"model": "tiny"}, 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, param", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(srv, path, body, status, param):
    if isinstance(body, bytes):
        r = srv.http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = srv.http.post(path, json=body)
    err = assert_openai_error(r, status, param)
    if param == "max_tokens":
        assert "max_tokens" in err["message"], err


def test_bad_requests_leave_server_serving(srv):
    assert_openai_error(srv.http.get("/v1/no-such-route"), 404)
    assert_openai_error(srv.http.get("/v1/completions"), 405)
    r = srv.http.post(C, json=OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    wait_all_free(srv.engine)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_stay_inside_one_sse_event(srv, sep):
    """An echoed prompt with U+2028 (found by the HTTP fuzz): every line of the stream, split
    the way str.splitlines() splits (httpx's iter_lines), is a whole `data:` event, and the
    text decodes back to the separator."""
    body = {"model": "tiny", "prompt": [f"w71 w362 {sep}"], "echo": True, "max_tokens": 1,
            "stream": True}
    with srv.http.stream("POST", C, json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]  # each a whole JSON object
    assert sep in "".join(e["choices"][0]["text"] for e in events)


def test_oversized_body(srv):
    big = {**OK, "prompt": "w5 " * 400_000}  # ~1.2 MB > the 1 MiB default
    assert_openai_error(srv.http.post(C, json=big), 413)
    payload = json.dumps(big).encode()

    def chunked():  # no Content-Length: the limit must count the bytes actually received
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    assert_openai_error(srv.http.post(C, content=chunked(),
                                      headers={"content-type": "application/json"}), 413)
    assert srv.http.post(C, json=OK).status_code == 200


def test_api_key(srv):
    with httpx.Client(base_url=srv.auth_url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY}):
            err = assert_openai_error(http.post(C, json=OK, headers=headers), 401)
            assert API_KEY not in json.dumps(err)
            assert_openai_error(http.get("/v1/models", headers=headers), 401)
        # auth comes before body parsing: malformed JSON without a key is still a 401
        assert_openai_error(http.post(C, content=b"{",
                                      headers={"content-type": "application/json"}), 401)
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post(C, json=OK, headers=good).status_code == 200
        assert http.get("/health").status_code == 200


# ---- disconnects ------------------------------------------------------------------

class slow_steps:
    """Make each engine step take >= 10 ms, so generation outlasts the client."""

    def __init__(self, engine):
        self.llm_engine = engine.engine

    def __enter__(self):
        step = self.llm_engine.step

        def slow():
            time.sleep(0.01)
            return step()

        self.llm_engine.step = slow

    def __exit__(self, *exc):
        del self.llm_engine.step


def test_stream_disconnect_aborts_and_frees_blocks(srv):
    before = len(srv.client.closed_early)
    body = {**OK, "prompt": "w5 w6 w7", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with slow_steps(srv.engine):
        with srv.http.stream("POST", C, json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.time() + 10
        while len(srv.client.closed_early) == before:
            assert time.time() < deadline, "the engine stream was not closed on disconnect"
            time.sleep(0.05)
        wait_all_free(srv.engine)


def test_non_stream_disconnect_aborts(srv):
    before = len(srv.client.closed_early)
    body = {**OK, "prompt": "w5 w6 w7", "max_tokens": 120, "ignore_eos": True}
    with slow_steps(srv.engine):
        with pytest.raises(httpx.TimeoutException):
            srv.http.post(C, json=body, timeout=0.3)
        deadline = time.time() + 10
        while len(srv.client.closed_early) == before:
            assert time.time() < deadline, "the request was not aborted on disconnect"
            time.sleep(0.05)
        wait_all_free(srv.engine)
    assert srv.http.post(C, json=OK).status_code == 200


# ---- engine failures (a stub client, no engine) -----------------------------------

class StubClient:
    """An EngineClient whose generate fails the way a test asks (`mode`)."""

    model_name, max_model_len = "stub", 64

    def __init__(self, tokenizer):
        self.tokenizer, self.mode, self.healthy = tokenizer, "ok", True

    async def generate(self, prompt_token_ids, params, request_id):
        from raylm.engine.async_engine import EngineDeadError
        from raylm.outputs import CompletionOutput, RequestOutput
        from raylm.serve.errors import EngineOverloadedError

        failures = {"dead": EngineDeadError("engine step failed"),
                    "busy": EngineOverloadedError("full"), "bug": KeyError("oops")}
        if self.mode in failures:
            raise failures[self.mode]
        yield RequestOutput(request_id, None, prompt_token_ids, [CompletionOutput(0, "w9", [12])])
        raise RuntimeError("replica lost mid-stream")

    async def check_health(self):
        if not self.healthy:
            raise RuntimeError("worker gone")


def test_engine_failures_map_to_openai_errors(tiny_llama):
    from starlette.testclient import TestClient
    from transformers import AutoTokenizer

    stub = StubClient(AutoTokenizer.from_pretrained(tiny_llama))
    http = TestClient(create_app(stub), raise_server_exceptions=False)
    body = {"model": "stub", "prompt": "w5", "max_tokens": 4}
    for mode, status in (("dead", 503), ("busy", 429), ("bug", 500)):
        stub.mode = mode
        r = http.post(C, json=body)
        assert_openai_error(r, status)
        if status == 429:
            assert int(r.headers["retry-after"]) >= 1
    stub.mode = "ok"  # an error after the first chunk arrives in-band, then the stream ends
    r = http.post(C, json={**body, "stream": True})
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "w9"
    assert json.loads(events[1])["error"]["type"] == "server_error" and events[2] == "[DONE]"
    assert http.get("/health").status_code == 200
    stub.healthy = False
    assert_openai_error(http.get("/health"), 503)
