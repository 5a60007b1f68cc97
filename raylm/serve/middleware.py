"""Pure ASGI middleware for the OpenAI app: API key, body size limit, last-resort errors.

They run before FastAPI reads the body, so an unauthenticated or oversized request is
refused before any JSON parsing or validation happens.
"""
from __future__ import annotations

import secrets
from typing import Iterable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raylm.serve.errors import body_too_large, error_response, to_api_error, unauthorized

# Paths that need no API key by default: probes, which reveal nothing. /metrics (load, model
# names, request counts) is guarded unless configured open (`--open-paths ... /metrics`).
OPEN_PATHS = ("/health", "/ping", "/version")


# Admin routes: they change the deployment, so they take the admin key, never the inference key.
ADMIN_PATHS = ("/scale_elastic_ep", "/is_scaling_elastic_ep")
ADMIN_SCOPE = "raylm.admin"  # set on the ASGI scope of a request the admin key let through


def bearer_matches(scope: Scope, key: bytes) -> bool:
    """`Authorization: Bearer <key>` on this request, compared in constant time."""
    header = b""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header = value
            break
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key)


class ApiKeyMiddleware:
    """Every HTTP path except `open_paths` (and admin routes, which AdminKeyMiddleware has
    checked) needs `Authorization: Bearer <key>`.

    The comparison is constant-time; the key is never logged or echoed."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._key = api_key.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in self.open_paths or scope.get(ADMIN_SCOPE)
                or bearer_matches(scope, self._key)):
            await self.app(scope, receive, send)
            return
        await error_response(unauthorized())(scope, receive, send)


class AdminKeyMiddleware:
    """Admin routes answer only to `Authorization: Bearer <admin key>` (401 otherwise, the
    inference key included). Without an admin key the app must not register them: requests
    then pass through and get what any unknown path gets (401 without the inference key,
    404 with it), so nobody can act through them or learn they are there."""

    def __init__(self, app: ASGIApp, admin_api_key: Optional[str],
                 admin_paths: Iterable[str] = ADMIN_PATHS):
        self.app = app
        self._key = admin_api_key.encode() if admin_api_key else None
        self.admin_paths = frozenset(admin_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.admin_paths or self._key is None:
            await self.app(scope, receive, send)
        elif bearer_matches(scope, self._key):
            await self.app({**scope, ADMIN_SCOPE: True}, receive, send)
        else:
            await error_response(unauthorized("admin "))(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: by Content-Length up front, and by
    counting the bytes actually received (chunked bodies, lying headers). The body is read
    here in full (it is at most `max_bytes`) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _declared_length(self, scope: Scope) -> Optional[int]:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(body_too_large(self.max_bytes))(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(body_too_large(self.max_bytes))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for http.disconnect, as the server would

    return replay


class CatchAllMiddleware:
    """Last resort: an exception that escaped every handler becomes an OpenAI-shaped error
    (500 for a genuine bug, logged with its traceback) instead of a plain-text 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            err = to_api_error(exc)
            if not started:
                await error_response(err)(scope, receive, send)
