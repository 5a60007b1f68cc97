"""Exceptions that cross layers (engine -> replica -> ingress -> HTTP), importable without
torch or Ray. `raylm.serve.errors` maps each to its HTTP answer by class name, so the
mapping also holds for copies unpickled from another process."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop failed (or is stuck); every in-flight request ends with this error."""


class EngineOverloadedError(RuntimeError):
    """Admission refused: a waiting-request bound is reached. Answered 429 with Retry-After."""


class EngineUnavailableError(RuntimeError):
    """No live engine can serve (replica gone, app shutting down). Answered 503."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline (`request_timeout_s`) and was aborted. Answered 408."""
