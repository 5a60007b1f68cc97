"""App-wide admission at the OpenAI ingress: how many generation requests the app holds,
how long each may run, and the shutdown drain.

Every engine request (one per prompt) passes through `Admission.guard`:
  - past `max_ongoing_requests` in flight in the app -> EngineOverloadedError (429 with
    Retry-After); each replica also bounds its own waiting queue (`max_waiting_requests`,
    checked in AsyncEngine), so no queue anywhere grows without bound;
  - past `request_timeout_s` since arrival (queueing included) -> RequestTimeoutError (408)
    and the request is aborted in its replica;
  - while draining for shutdown -> new requests get EngineUnavailableError (503); at the
    drain deadline the requests still running are cut off with a 503-kind error (an SSE
    error event when the stream has started), never silently.
Closing the guarded stream (client gone) closes the replica stream, which aborts the request.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional, TypeVar

from raylm.exceptions import EngineOverloadedError, EngineUnavailableError, RequestTimeoutError

T = TypeVar("T")
_END = object()
FLUSH_S = 0.5  # after the cut-off: time for the error events to reach the clients


class Admission:
    def __init__(self, max_ongoing_requests: int, request_timeout_s: Optional[float] = None) -> None:
        if max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1 (got {max_ongoing_requests})")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds (got {request_timeout_s})")
        self.max_ongoing_requests = max_ongoing_requests
        self.request_timeout_s = request_timeout_s
        self.ongoing = 0  # guarded streams open now
        self.draining = False
        self.shutdown_timeout_s: Optional[float] = None
        self._cutoff: Optional[asyncio.Future] = None

    def admit(self) -> None:
        """Raise if a new request may not start now."""
        if self.draining:
            raise EngineUnavailableError("The server is shutting down and accepts no new requests.")
        if self.ongoing >= self.max_ongoing_requests:
            raise EngineOverloadedError(f"{self.ongoing} requests are in flight in the app "
                                        f"(max_ongoing_requests={self.max_ongoing_requests})")

    async def guard(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """Admit one request and yield `stream`'s items under its deadline and the shutdown cut-off."""
        self.admit()
        self.ongoing += 1
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        try:
            while (item := await self._next(stream, deadline)) is not _END:
                yield item
        finally:
            self.ongoing -= 1
            await stream.aclose()  # aborts the request in its replica if it has not finished

    async def _next(self, stream: AsyncIterator[T], deadline: Optional[float]):
        step = asyncio.ensure_future(anext(stream, _END))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait({step, self._cutoff_future()}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not step.done():
                step.cancel()
                await asyncio.wait({step})  # let the stream settle before anyone closes it
        if not step.cancelled():
            return step.result()
        if self._cutoff_future().done():
            raise EngineUnavailableError(f"The server shut down before this request finished "
                                         f"(shutdown timeout {self.shutdown_timeout_s:g} s).")
        if deadline is not None and time.monotonic() >= deadline:
            raise RequestTimeoutError(f"The request did not finish within request_timeout="
                                      f"{self.request_timeout_s:g} s and was aborted.")
        raise asyncio.CancelledError()  # the stream itself was cancelled

    def _cutoff_future(self) -> asyncio.Future:
        """Done at the shutdown cut-off; one future every stream waits on (no task per item)."""
        if self._cutoff is None:
            self._cutoff = asyncio.get_running_loop().create_future()
        return self._cutoff

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: refuse new requests, let those in flight finish for up to `timeout_s`,
        then cut off the rest with an error. Returns how many were cut off."""
        self.draining, self.shutdown_timeout_s = True, timeout_s
        deadline = time.monotonic() + timeout_s
        while self.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.ongoing
        if cut:
            self._cutoff_future().set_result(None)
            end = time.monotonic() + 5.0
            while self.ongoing and time.monotonic() < end:
                await asyncio.sleep(0.05)
            await asyncio.sleep(FLUSH_S)
        return cut
