"""Streaming plumbing: SSE responses that abort on disconnect, merged engine streams, and
per-choice deltas from cumulative outputs.

Disconnects propagate by closing async generators: an engine iterator that is closed (or
cancelled) before its request finished aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Dict, List, Optional, Sequence, Tuple

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from raylm.outputs import CompletionOutput, PositionLogprobs

SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it, but logs do


# JSON may carry U+2028, U+2029 and U+0085 raw, and clients that split a stream with
# str.splitlines() (httpx's iter_lines among them) end a line there and get half an event.
# Escaped, they are the same JSON string and no client splits them (found by the HTTP fuzz).
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(payload_json: str) -> str:
    return f"data: {payload_json.translate(_LINE_BREAKS)}\n\n"


class EventStreamResponse(StreamingResponse):
    """text/event-stream that watches for the client leaving whatever the ASGI spec version,
    and always closes its body iterator and `upstream` (the engine iterator it reads, in case
    the body never started): closing them aborts unfinished requests."""

    def __init__(self, content: AsyncIterator[str], upstream: Optional[AsyncIterator[Any]] = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the socket went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await _close(self.body_iterator)
            await _close(self._upstream)


async def _close(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        # still running in a cancelled task: it aborts itself
        with contextlib.suppress(RuntimeError):
            await aclose()


async def run_until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run a handler's work; if the client disconnects first, cancel it (cancelling the engine
    iterators it is reading aborts their requests) and answer 499 to nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(BaseException):
            await task
        return Response(status_code=CLIENT_CLOSED)
    return task.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next(iterator: AsyncIterator[Any]) -> Any:
    return await iterator.__anext__()


async def merge_async_iterators(
        iterators: Sequence[AsyncIterator[Any]]) -> AsyncIterator[Tuple[int, Any]]:
    """Yield (source index, item) as items arrive from several async iterators. Closing the
    merged iterator (or an error in one source) cancels and closes every source."""
    pending: Dict[asyncio.Future, int] = {}
    try:
        if len(iterators) == 1:  # the common case, without tasks
            async for item in iterators[0]:
                yield 0, item
            return
        pending = {asyncio.ensure_future(_next(it)): i for i, it in enumerate(iterators)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(_next(iterators[i]))] = i
                yield i, item
    finally:
        for fut in pending:
            fut.cancel()
        for it in iterators:
            await _close(it)


@dataclass
class ChoiceDelta:
    """What one choice gained since the last delta."""

    text: str
    token_ids: List[int]
    logprobs: Optional[List[PositionLogprobs]]
    finish_reason: Optional[str]
    stop_reason: Any
    first: bool


@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    started: bool = False
    finished: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # per-choice state for the caller


class DeltaTracker:
    """Turns cumulative CompletionOutputs into deltas, one state per choice key.

    The engine keeps updating the same output object after queueing it, so a queued output
    may already hold later steps by the time it is read; so
    the finish reason is read first: once it is set, the text and tokens are final."""

    def __init__(self) -> None:
        self.sent: Dict[Any, _Sent] = {}

    def state(self, key: Any) -> _Sent:
        return self.sent.setdefault(key, _Sent())

    def delta(self, key: Any, out: CompletionOutput) -> Optional[ChoiceDelta]:
        """The new text/tokens/logprobs of choice `key`; None when there is nothing to send."""
        state = self.state(key)
        if state.finished:
            return None
        finish, stop_reason = out.finish_reason, out.stop_reason
        text, logprobs = out.text, out.logprobs
        num_tokens = len(logprobs) if logprobs is not None else len(out.token_ids)
        new_text = text[state.text:]
        if not new_text and finish is None:
            return None  # tokens without visible text ride along with the next delta
        new_ids = list(out.token_ids[state.tokens:num_tokens])
        new_lps = list(logprobs[state.tokens:num_tokens]) if logprobs is not None else None
        delta = ChoiceDelta(new_text, new_ids, new_lps, finish, stop_reason if finish else None,
                            not state.started)
        state.text, state.tokens, state.started = len(text), num_tokens, True
        state.finished = finish is not None
        return delta
