"""The client side of `raylm bench serve`: one streaming OpenAI request, its SSE parsing,
and its timing (send, first token, every later chunk, end).

Works against any OpenAI-compatible server (`/v1/completions` or `/v1/chat/completions`).
Times come from `time.perf_counter()` when a network read returns, so a chunk is timed on
arrival, not when its JSON is parsed.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from raylm.config import openai_api_key

if TYPE_CHECKING:  # aiohttp is imported where a session is opened
    import aiohttp

    from raylm.bench.workload import BenchRequest


def is_chat_endpoint(endpoint: str) -> bool:
    """True for a chat completions path, False for a completions path; else ValueError."""
    path = endpoint.rstrip("/")
    if path.endswith("/chat/completions"):
        return True
    if path.endswith("/completions"):
        return False
    raise ValueError(f"endpoint {endpoint!r} is neither .../completions nor .../chat/completions")


def request_body(chat: bool, model: str, prompt: str, max_tokens: int, temperature: float,
                 ignore_eos: bool) -> Dict[str, Any]:
    """The JSON body of one streaming request (usage asked for in the last chunk)."""
    body: Dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


class SSEDecoder:
    """Incremental server-sent-events parser: feed raw bytes, get the `data:` payloads of
    every event completed so far (multi-line data joined by newlines; comments dropped)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._cr = ""  # a trailing '\r' held back: it may be the first half of '\r\n'

    def feed(self, data: bytes) -> List[str]:
        """Payloads of the events that `data` completes, in order."""
        text = self._cr + self._utf8.decode(data)
        self._cr = "\r" if text.endswith("\r") else ""
        text = text[:-1] if self._cr else text
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        *events, self._buffer = self._buffer.split("\n\n")
        payloads = []
        for event in events:
            lines = [line[5:] for line in event.split("\n") if line.startswith("data:")]
            if lines:
                payloads.append("\n".join(line[1:] if line.startswith(" ") else line
                                          for line in lines))
        return payloads


class StreamError(RuntimeError):
    """The server sent an error object inside the stream, or the stream was unusable."""


@dataclass
class RequestOutput:
    """Timing and outcome of one request. Times in seconds; `start` is the send time
    relative to the start of the benchmark once the run has finished."""

    prompt_len: int = 0
    expected_output_len: int = 0
    success: bool = False
    status: Optional[int] = None
    error: str = ""
    start: float = 0.0
    ttft: Optional[float] = None
    itl: List[float] = field(default_factory=list)
    e2el: Optional[float] = None
    chunks: int = 0
    usage_output_tokens: Optional[int] = None
    usage_prompt_tokens: Optional[int] = None

    @property
    def output_tokens(self) -> int:
        """Generated tokens: the server's usage count when it sent one, else token chunks."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else self.chunks

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens: the server's usage count when it sent one, else the workload's."""
        return (self.usage_prompt_tokens if self.usage_prompt_tokens is not None
                else self.prompt_len)

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first: (e2el - ttft) / (tokens - 1); None below 2
        tokens."""
        if not self.success or self.output_tokens < 2 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def status_key(self) -> str:
        """How a failure is counted: the HTTP status, or 'no-response' when none came back."""
        return str(self.status) if self.status is not None else "no-response"

    def on_event(self, obj: dict, now: float, last: float, chat: bool) -> float:
        """Account one parsed stream chunk received at `now`; returns the time of the latest
        token chunk (`last` when this chunk carries no text)."""
        if obj.get("error"):
            raise StreamError(f"error in stream: {obj['error']}")
        usage = obj.get("usage")
        if usage:
            self.usage_output_tokens = usage.get("completion_tokens", self.usage_output_tokens)
            self.usage_prompt_tokens = usage.get("prompt_tokens", self.usage_prompt_tokens)
        if not _chunk_text(obj, chat):
            return last
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - last)
        self.chunks += 1
        return now


def _chunk_text(obj: dict, chat: bool) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


async def send_request(session: "aiohttp.ClientSession", url: str, body: dict, headers: dict,
                       chat: bool, prompt_len: int = 0) -> RequestOutput:
    """POST one streaming request and time it. Never raises for server or network errors:
    they come back as `success=False` with the status (if any) and a message."""
    out = RequestOutput(prompt_len=prompt_len, expected_output_len=body.get("max_tokens", 0))
    out.start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:500]
                return out
            await _read_stream(resp, out, chat)
        out.e2el = time.perf_counter() - out.start
        out.success = out.chunks > 0
        if not out.success:
            out.error = "the stream carried no tokens"
    except Exception as exc:  # network errors, timeouts, bad JSON, errors in the stream
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def _read_stream(resp: "aiohttp.ClientResponse", out: RequestOutput, chat: bool) -> None:
    decoder = SSEDecoder()
    last = out.start
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        for payload in decoder.feed(data):
            if payload.strip() == "[DONE]":
                continue
            last = out.on_event(json.loads(payload), now, last, chat)


@contextlib.asynccontextmanager
async def http_sender(args: argparse.Namespace, requests: List[BenchRequest]):
    """Yields send(i): POST request i as a streaming OpenAI request and time it."""
    import aiohttp

    chat = is_chat_endpoint(args.endpoint)
    url = args.base_url.rstrip("/") + "/" + args.endpoint.lstrip("/")
    headers = auth_headers(args)
    if args.data_parallel_rank is not None:
        headers["X-data-parallel-rank"] = str(args.data_parallel_rank)
    bodies = [request_body(chat, args.model, r.prompt, r.output_len, args.temperature,
                           args.ignore_eos)
              for r in requests]
    # alternating with an in-process run leaves a kept-alive connection idle for as long as
    # a request takes; servers may close it meanwhile (llama-server did, every other request)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or len(requests),
                                     force_close=args.alternate_inprocess)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=args.timeout)) as s:
        yield lambda i: send_request(s, url, bodies[i], headers, chat, requests[i].prompt_len)


def auth_headers(args: argparse.Namespace) -> Dict[str, str]:
    """The bearer token header: --api-key, else $OPENAI_API_KEY (the OpenAI client's variable)."""
    api_key = args.api_key or openai_api_key()
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
