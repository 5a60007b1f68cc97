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
from typing import AsyncIterator, Optional, Set, TypeVar

from raylm.exceptions import EngineOverloadedError, EngineUnavailableError, RequestTimeoutError

T = TypeVar("T")
_END = object()
FLUSH_S = 0.5  # after the cut-off: time for the error events to reach the clients


class _Watch:
    """One guarded stream: the task awaiting its next item (None between items) and, once
    set, the error that ends it (its deadline passed, or the shutdown cut-off came)."""

    __slots__ = ("task", "error")

    def __init__(self) -> None:
        self.task: Optional[asyncio.Task] = None
        self.error: Optional[Exception] = None


class Admission:
    """The ingress's app-wide admission: the in-flight bound, each request's deadline and
    the shutdown drain (module docstring)."""

    def __init__(self, max_ongoing_requests: int,
                 request_timeout_s: Optional[float] = None) -> None:
        if max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1 (got {max_ongoing_requests})")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds (got {request_timeout_s})")
        self.max_ongoing_requests = max_ongoing_requests
        self.request_timeout_s = request_timeout_s
        self.draining = False
        self._watches: Set[_Watch] = set()  # one per guarded stream open now

    @property
    def ongoing(self) -> int:
        """Guarded streams open now."""
        return len(self._watches)

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: refuse new requests, let those in flight finish for up to `timeout_s`,
        then cut off the rest with an error. Returns how many were cut off."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.ongoing
        if cut:
            for watch in self._watches:
                _interrupt(watch, EngineUnavailableError(
                    f"The server shut down before this request finished "
                    f"(shutdown timeout {timeout_s:g} s)."))
            end = time.monotonic() + 5.0
            while self.ongoing and time.monotonic() < end:
                await asyncio.sleep(0.05)
            await asyncio.sleep(FLUSH_S)
        return cut

    def admit(self) -> None:
        """Raise if a new request may not start now."""
        if self.draining:
            raise EngineUnavailableError("The server is shutting down and accepts no new "
                                         "requests.")
        if self.ongoing >= self.max_ongoing_requests:
            raise EngineOverloadedError(f"{self.ongoing} requests are in flight in the app "
                                        f"(max_ongoing_requests={self.max_ongoing_requests})")

    async def guard(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """Admit one request and yield `stream`'s items under its deadline and the shutdown
        cut-off. Neither costs anything per item: a timer (the deadline) or the drain (the
        cut-off) cancels the task awaiting the stream, and that await raises their error."""
        self.admit()
        watch = _Watch()
        self._watches.add(watch)
        timer = None
        if self.request_timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(
                self.request_timeout_s, _interrupt, watch, RequestTimeoutError(
                    f"The request did not finish within request_timeout="
                    f"{self.request_timeout_s:g} s and was aborted."))
        try:
            while (item := await _next(stream, watch)) is not _END:
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            self._watches.discard(watch)
            await stream.aclose()  # aborts the request in its replica if it has not finished


def _interrupt(watch: _Watch, error: Exception) -> None:
    if watch.error is None:
        watch.error = error
        if watch.task is not None:
            watch.task.cancel()


async def _next(stream: AsyncIterator[T], watch: _Watch):
    """The stream's next item (or _END); a watch's error instead once it has one."""
    if watch.error is not None:
        raise watch.error
    watch.task = task = asyncio.current_task()
    try:
        return await anext(stream, _END)
    except asyncio.CancelledError:
        if watch.error is None:
            raise  # the consumer itself was cancelled (client gone)
        task.uncancel()  # our own cancel: it becomes the watch's error
        raise watch.error from None
    finally:
        watch.task = None
