"""Waiting on a condition in tests: poll it until it holds or a deadline passes, then fail
naming the condition. Tests use these instead of sleeping for "long enough": a sleep that
is long enough on one machine is too short on a slower one, and the test then goes on
without the state it needs and fails on a side effect (or, worse, passes vacuously)."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable, Optional

import pytest


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2,
             detail: Optional[Callable[[], Any]] = None) -> Any:
    """Poll `predicate` until it returns something truthy (returned); past `timeout_s`,
    fail the test with "`what` did not happen within N s" and the last value seen (or
    `detail()`, when given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = detail() if detail is not None else value
            pytest.fail(f"{what} did not happen within {timeout_s:g} s (last: {seen!r})")
        time.sleep(interval_s)


async def async_wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
                         interval_s: float = 0.1) -> Any:
    """`wait_for` inside an event loop; `predicate` may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:g} s (last: {value!r})")
        await asyncio.sleep(interval_s)
