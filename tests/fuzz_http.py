"""Hypothesis fuzzing of the OpenAI-compatible HTTP API of a running server.

run_fuzz(base_url, num_requests) sends generated requests one at a time (JSON bodies for the model
endpoints from tests/fuzz_cases.py; malformed requests and probes from here) and checks that
- each gets an answer below 500 (a transport error or a timeout, e.g. a hang, is a violation)
  with the status it calls for ("200" for every well-formed request);
- on our app's routes (OWNED) every error is OpenAI-shaped and every other 200 JSON; other paths
  may get anything below 500 (Ray Serve's proxy answers some itself);
- a 200 stream is SSE: data: lines of JSON, [DONE] last, in-band errors OpenAI-shaped (and none
  where 200 was expected), every choice finished; a 200 completion or chat has n x prompts choices.
Violations are collected, each with a copy-paste reproduction (repro).
"""
from __future__ import annotations

import base64
import json
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote, unquote

from hypothesis import (HealthCheck, Phase, given, seed as hypothesis_seed, settings,
                        strategies as st)

from raylm.serve.middleware import OPEN_PATHS
from tests.fuzz_admin import admin_case
from tests.fuzz_cases import (SCALARS, Case, Draw, Env, chat_case, completion_case,
                              detokenize_case, dump_json, tokenize_case)

try:
    import httpx2 as httpx  # the client the other OpenAI tests use, when installed
except ImportError:  # pragma: no cover
    import httpx

POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
GET_ROUTES = ("/v1/models", "/health", "/version")
OWNED = ("/v1/", "/tokenize", "/detokenize", "/health", "/version", "/scale_elastic_ep",
         "/is_scaling_elastic_ep")  # our app answers these, proxy or not
JSON_CT = {"content-type": "application/json"}


@dataclass
class Violation:
    label: str
    problem: str
    status: int  # 0: no answer
    response: str
    repro: str

    def __str__(self) -> str:
        return (f"[{self.label}] {self.problem}\n    got {self.status}: {self.response}\n    "
                f"repro: {self.repro}")


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)  # status -> count (0: no answer)
    streamed: int = 0  # 200 SSE answers
    labels: Counter = field(default_factory=Counter)  # kind of request -> count
    records: List[Tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    violations: List[Violation] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, lo: int, hi: int) -> int:
        return sum(n for status, n in self.statuses.items() if lo <= status < hi)

    def summary(self) -> str:
        lines = [f"{self.requests} requests in {self.seconds:.1f}s, {self.streamed} streamed, "
                 f"{len(self.violations)} violations; statuses "
                 f"{dict(sorted(self.statuses.items()))}",
                 f"kinds: {dict(sorted(self.labels.items()))}"] + [str(v)
                                                                   for v in self.violations[:20]]
        if len(self.violations) > 20:
            lines.append(f"... and {len(self.violations) - 20} more")
        return "\n".join(lines)


BROKEN_JSON = [b"{", b'{"model": tiny}', b"{'prompt': 'w5'}", b'{"prompt": "w5",}',
               b"\xff\xfe{\x00}\x00", b"nul", b'{"prompt": "w5"} trailing',
               b'{"prompt": "w5" "max_tokens": 1}', b'{"prompt": "\xc3\x28"}', b"{" * 50,
               b'{"prompt": "w5", "max_tokens": 01}', b'{"prompt": "w5"} {}', b"", b"[]",
               # the last ones JSON, but not an object
               b'[{"prompt": "w5"}]', b'"w5"', b"5", b"null", b"NaN"]
NOT_JSON_TYPES = [None, "", "text/plain", "multipart/form-data; boundary=x", "text/json",
                  "application/jsonx"]
JSON_TYPES = ["application/json; charset=utf-8", "APPLICATION/JSON",
              "application/merge-patch+json"]


def _ok(d: Draw) -> bytes:
    return dump_json({"model": d.env.model_names[0], "prompt": "w5 w6", "max_tokens": 2})


def bad_json(d: Draw) -> Case:
    valid = _ok(d)
    content = d.weighted((30, lambda d: valid[:d.randint(0, len(valid) - 1)]),
                         (20, st.binary(max_size=64)), (35, lambda d: d.choice(BROKEN_JSON)),
                         (15, lambda d: dump_json(d.value(SCALARS))))
    return Case("bad-json", "POST", d.choice(POST_ROUTES), content, d.choice([JSON_CT, {}]), "400")


def content_type(d: Draw) -> Case:
    ctype = d.choice(NOT_JSON_TYPES + JSON_TYPES)
    return Case("content-type", "POST", "/v1/completions", _ok(d),
                {} if ctype is None else {"content-type": ctype},
                "200" if ctype in JSON_TYPES else "4xx", choices=1)


def deep_json(d: Draw) -> Case:
    depth, (opener, closer) = (d.choice([10, 100, 2000, 150000]),
                               d.choice([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    # a nested prompt: 400; an unknown field: ignored if it parses
    where = d.choice(["prompt", "extra"])
    fields = {"model": d.env.model_names[0], "max_tokens": 2,
              **({} if where == "prompt" else {"prompt": "w5 w6"})}
    content = dump_json(fields)[:-1] + f', "{where}": {nested}}}'.encode()
    expect = "400" if where == "prompt" else "200" if depth <= 100 else "any"
    return Case("deep-json", "POST", "/v1/completions", content, JSON_CT, expect, choices=1)


def wrong_method(d: Draw) -> Case:
    path = d.choice(POST_ROUTES + GET_ROUTES)
    method = d.choice(["PUT", "DELETE", "PATCH", "OPTIONS"]
                      + (["GET", "HEAD"] if path in POST_ROUTES else ["POST"]))
    body = _ok(d) if method in ("POST", "PUT", "PATCH") else None
    return Case("wrong-method", method, path, body, JSON_CT if body else {}, "405")


def unknown_path(d: Draw) -> Case:
    segments = [d.value(st.text(min_size=1, max_size=8)) if d.pct(50) else
                d.choice(["completions", "models", "v1", "%", "..x", "~"])
                for _ in range(d.randint(0, 3))]
    path = d.choice(["", "/v1", "/v2", "/v1/chat", "/v1/completions", "/v1/models", "/health",
                     "/tokenize"]) + \
        "".join("/" + quote(s, safe="") for s in segments
                if s.strip("."))  # clients resolve dot segments
    path = (path + "/" if d.pct(40) else path) or "/"
    path += d.choice(["", "", "?stream=true", "?a=%00"])
    method = d.choice(["GET", "POST", "DELETE"])
    return Case("unknown-path", method, path, _ok(d) if method == "POST" else None, JSON_CT)


def oversized(d: Draw) -> Case:  # refused by Content-Length, or (chunked) by the bytes that arrive
    size = d.env.max_body_bytes + d.randint(1, 300_000)
    body = dump_json({"model": d.env.model_names[0], "prompt": "w5 " * (size // 3),
                      "max_tokens": 1})
    return Case("oversized", "POST", d.choice(POST_ROUTES), body, JSON_CT, "413",
                chunked=d.pct(50))


def probe(d: Draw) -> Case:
    path, method = d.choice(["/health", "/version", "/v1/models", "/ping",
                             "/metrics"]), d.choice(["GET", "HEAD"])
    return Case("probe", method, path,
                expect="200" if path in GET_ROUTES and method == "GET" else "any")


def authorize(d: Draw, case: Case) -> Case:
    """The key on every request; for bad_auth none or a near miss instead, and 401 off the open
    paths."""
    key = d.env.api_key
    if case.label == "admin" and d.env.admin_api_key:  # sends the admin key (or not) itself
        return case
    if d.env.bad_auth:
        key = key or "sk-unknown"
        header = d.choice([None, None, "Bearer wrong", "Bearer", f"Basic {key}", key,
                           f"Bearer {key}x", f"Bearer {key[:-1]}", f"Bearer {key.upper()}"])
        case.expect = case.expect if unquote(case.path.split("?")[0]) in OPEN_PATHS else "401"
    else:
        header = f"Bearer {key}" if key else None
    # a copy
    case.headers = {**case.headers, **({} if header is None else {"authorization": header})}
    return case


@st.composite
def cases(draw, env: Env) -> Case:
    # Hypothesis also replays and mutates earlier examples: about half the requests repeat an
    # earlier one's structure (its seed) with other leaf values, and kinds with many leaf values
    # come up more often.
    d = Draw(draw(st.randoms(use_true_random=True)).getrandbits(64), draw, env)
    case = d.weighted((42, completion_case), (32, chat_case), (4, tokenize_case),
                      (3, detokenize_case), (4, bad_json), (2, content_type), (1, deep_json),
                      (3, wrong_method), (3, unknown_path), (1, oversized), (5, probe),
                      (3, admin_case))
    return authorize(d, case)


def allowed(expect: str, status: int) -> bool:
    return status < 500 and (expect in ("any", str(status))
                             or (expect == "4xx" and 400 <= status < 500))


def error_problem(data: Any) -> Optional[str]:
    """None if `data` is OpenAI's {"error": {"message", "type", "param", "code"}}, message and type
    set."""
    err = data.get("error") if isinstance(data, dict) else None
    ok = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and all(
        isinstance(err[k], str) and err[k] for k in ("message", "type"))
    return None if ok else "not an OpenAI error"


def stream_problem(case: Case, lines: Iterable[str]) -> Optional[str]:
    """What is wrong with a 200 SSE answer, or None."""
    # blank lines and comments aside
    lines = [line for line in lines if line and not line.startswith(":")]
    if not lines or lines[-1] != "data: [DONE]":
        return f"the stream did not end with [DONE]: {lines[-2:]}"
    try:
        events = [json.loads(line[len("data: "):]) if line.startswith("data: ") else None
                  for line in lines[:-1]]
        finished = {c["index"] for e in events for c in e.get("choices") or []
                    if c.get("finish_reason")}
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"not every SSE line is data: and a JSON object: {lines[:3]}"
    errors = [e for e in events if "error" in e]
    for e in errors:
        problem = error_problem(e) or ("an in-band error, expected 200" if case.expect == "200"
                                       else None)
        if problem:
            return f"{problem}: {json.dumps(e)[:300]}"
    if not errors and case.choices is not None and finished != set(range(case.choices)):
        return f"finished choices {sorted(finished)}, expected {case.choices}"
    return None


def response_problem(case: Case, status: int, body: bytes) -> Optional[str]:
    """What is wrong with an answer that is not a stream, or None."""
    if not allowed(case.expect, status):
        return f"status {status}, expected {case.expect}"
    route = unquote(case.path.split("?")[0])
    if not route.startswith(OWNED) or case.method == "HEAD":
        return None  # not our app's answer, or no body
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status >= 400:
        return error_problem(data)
    if status != 200 or route == "/health":
        return None
    if case.stream or not isinstance(data, dict):
        return ("a JSON answer to a streaming request" if case.stream
                else "a 200 that is not a JSON object")
    got = len(data.get("choices") or [])
    return (None if case.choices is None or got == case.choices
            else f"{got} choices, expected {case.choices}")


def exchange(http: httpx.Client, case: Case, report: FuzzReport) -> Tuple[int, str, Optional[str]]:
    """Send `case`: its status, the start of its answer and what is wrong with it."""
    content = iter([case.body]) if case.chunked else case.body
    with http.stream(case.method, case.path, content=content, headers=case.headers) as r:
        if (r.status_code == 200
                and r.headers.get("content-type", "").startswith("text/event-stream")):
            report.streamed += 1
            if not case.stream or not allowed(case.expect, 200):
                return (200, "(a stream)",
                        f"a stream, expected {case.expect if case.stream else 'JSON'}")
            return 200, "(a stream)", stream_problem(case, r.iter_lines())
        body = r.read()
        return (r.status_code, body[:500].decode("utf-8", "replace"),
                response_problem(case, r.status_code, body))


def repro(case: Case, base_url: str, api_key: Optional[str]) -> str:
    """A Python line that sends `case` again (API_KEY: the server's key)."""
    content = repr(case.body)
    if case.body is not None and len(case.body) > 2000:
        packed = base64.b64encode(zlib.compress(case.body, 9)).decode()
        content = f"zlib.decompress(base64.b64decode({packed!r}))"
    headers = (repr(case.headers).replace(api_key, "' + API_KEY + '") if api_key
               else repr(case.headers))
    content = f"iter([{content}])" if case.chunked else content
    return (f"httpx.request({case.method!r}, {base_url + case.path!r}, headers={headers}, "
            f"content={content})")


def send(http: httpx.Client, case: Case, report: FuzzReport, base_url: str,
         api_key: Optional[str]) -> None:
    report.requests += 1
    report.labels[case.label] += 1
    try:
        status, response, problem = exchange(http, case, report)
    except httpx.HTTPError as exc:  # a transport error, or a timeout (a hang?)
        status, response, problem = 0, "", f"no answer: {exc!r}"
    report.statuses[status] += 1
    report.records.append((case.method, case.path, status))
    if problem:
        report.violations.append(Violation(case.label, problem, status, response,
                                           repro(case, base_url, api_key)))


def discover(http: httpx.Client, env: Env) -> Env:
    """The served model names, context length and whether the test chat template is in place."""
    headers = {"authorization": f"Bearer {env.api_key}"} if env.api_key else {}
    try:
        cards = http.get("/v1/models", headers=headers).json()["data"]
        env.model_names = [c["id"] for c in cards]
        env.max_model_len = cards[0].get("max_model_len") or env.max_model_len
        r = http.post("/tokenize", headers=headers,
                      json={"messages": [{"role": "user", "content": "w5 w6"}]})
        # w1 w5 w6 w2
        env.chat_template = r.status_code == 200 and r.json().get("tokens") == [4, 8, 9, 5]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        pass  # the defaults
    return env


def run_fuzz(base_url: str, num_requests: int, seed: int = 0, api_key: Optional[str] = None, *,
             bad_auth: bool = False, model_names: Sequence[str] = ("tiny", "tiny-alias"),
             max_model_len: int = 128, vocab_size: int = 512, max_body_bytes: int = 1 << 20,
             timeout: float = 30.0, admin_api_key: Optional[str] = None, dp: int = 1,
             max_dp: int = 1) -> FuzzReport:
    """Send `num_requests` generated requests to `base_url` and check each answer; deterministic
    per seed.

    api_key: sent as `Authorization: Bearer <api_key>` on every request; with bad_auth none or a
    wrong one instead, and every path but the open ones must answer 401. The model names and
    context length come from GET /v1/models where it answers, else from the arguments.
    """
    import torch

    # An engine built in this process set flush-to-zero on this thread (the worker does, for
    # speed); Hypothesis refuses to draw floats without IEEE subnormals.
    torch.set_flush_denormal(False)
    report, start, base_url = FuzzReport(), time.monotonic(), base_url.rstrip("/")
    env = Env(list(model_names), max_model_len, vocab_size, max_body_bytes, api_key=api_key,
              bad_auth=bad_auth, admin_api_key=admin_api_key, dp=dp, max_dp=max_dp)
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        strategy = cases(discover(http, env))

        def send_one(case: Case) -> None:  # Hypothesis may run more examples than asked
            if report.requests < num_requests:
                send(http, case, report, base_url, api_key)

        for round_ in range(20):  # or fewer (duplicates): top up
            if report.requests < num_requests:
                _fuzz_round(strategy, num_requests - report.requests, seed * 1000 + round_,
                            send_one)
    report.seconds = time.monotonic() - start
    return report


def _fuzz_round(strategy: st.SearchStrategy, examples: int, round_seed: int, send_one) -> None:
    @hypothesis_seed(round_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              print_blob=False)
    @given(st.data())
    def fuzz(data):
        # drawn even when not sent: an example must draw alike
        send_one(data.draw(strategy, label="case"))

    fuzz()
