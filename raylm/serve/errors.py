"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} for every non-2xx.

`APIError` carries a status and the OpenAI fields; helpers build the common ones. Exceptions
from elsewhere map by kind: validation errors and ValueError -> 400 (with `param` where the
field is known), engine death / unavailable replicas -> 503, back pressure -> 429. Engine
and Ray exception classes are matched by class name so this module imports neither torch
nor Ray. Anything else is a bug: logged with its traceback, answered 500 in OpenAI shape.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, List, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.exceptions import EngineOverloadedError, EngineUnavailableError, RequestTimeoutError
from raylm.serve.protocol_responses import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An error the HTTP layer answers as-is: status, OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST,
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> Dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model",
                    code="model_not_found")


def unauthorized(kind: str = "") -> APIError:
    """401; `kind` "admin " for the admin routes' key."""
    return APIError(401,
                    f"Invalid or missing {kind}API key: send 'Authorization: Bearer <{kind}key>'.",
                    code="invalid_api_key")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


def overloaded(message: str = "The server is overloaded; retry later.",
               retry_after: int = 1) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)})


def request_timeout(message: str) -> APIError:
    """408, as Ray Serve answers a request past its `request_timeout_s`."""
    return APIError(408, message, type="timeout_error", code="request_timeout")


def unavailable(message: str = "The engine is unavailable.", retry_after: int = 5) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="engine_unavailable",
                    headers={"Retry-After": str(retry_after)})


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse_error_event(err: APIError) -> str:
    """An error inside an SSE stream (headers already sent): one data event in OpenAI shape."""
    return f"data: {json.dumps(err.body())}\n\n"


# ---- mapping exceptions -----------------------------------------------------------

_UNAVAILABLE = {"EngineDeadError", "EngineUnavailableError", "RayActorError", "ActorDiedError",
                "ActorUnavailableError", "DeploymentUnavailableError"}
_OVERLOADED = {"EngineOverloadedError", "BackPressureError"}
# Fields a ValueError's first word may name (SamplingParams and engine validation messages).
_KNOWN_PARAMS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens", "stop",
                 "stop_token_ids", "logprobs", "top_logprobs", "prompt", "prompt_token_ids",
                 "messages", "tokens", "model", "request_id", "logit_bias", "prompt_logprobs",
                 "response_format", "structured_outputs", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar"}


def _param_from_message(message: str) -> Optional[str]:
    match = re.match(r"([a-z_]+)\b", message)
    if match and match.group(1) in _KNOWN_PARAMS:
        return "prompt" if match.group(1) == "prompt_token_ids" else match.group(1)
    return None


def from_validation_errors(errors: List[Dict[str, Any]]) -> APIError:
    """pydantic / FastAPI validation errors -> one 400 naming the first offending field."""
    first = errors[0]
    ctx_error = (first.get("ctx") or {}).get("error")
    if first.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {ctx_error or first.get('msg')}",
                           code="invalid_json")
    if getattr(ctx_error, "param", None) is not None or hasattr(ctx_error, "message"):
        return bad_request(str(ctx_error), getattr(ctx_error, "param", None))
    messages = []
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        messages.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    loc = [x for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc and isinstance(loc[0], str) else None
    return bad_request("; ".join(messages), param)


def api_error_for(exc: BaseException) -> Optional[APIError]:
    """The OpenAI error for a known kind of exception; None for an unexpected one (a bug)."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None)
    if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return api_error_for(cause)  # an error raised in a Serve replica: answer for what it wraps
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return from_validation_errors(list(exc.errors()))
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _UNAVAILABLE:
        return unavailable(f"The engine is unavailable: {exc}")
    if names & _OVERLOADED:
        return overloaded(f"The server is overloaded: {exc}; retry later." if str(exc) else
                          "The server is overloaded; retry later.")
    if "RequestTimeoutError" in names:
        return request_timeout(str(exc) or "The request timed out.")
    if isinstance(exc, ValueError):
        message = str(exc) or type(exc).__name__
        return bad_request(message, getattr(exc, "param", None) or _param_from_message(message))
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=dict(exc.headers or {}))
    return None


def internal_error(exc: BaseException) -> APIError:
    """Log an unexpected exception with its traceback; the client gets a 500 in OpenAI shape."""
    logger.error("unhandled error in the OpenAI server", exc_info=exc)
    return APIError(500, "Internal server error.", type="server_error", code="internal_error")


def to_api_error(exc: BaseException) -> APIError:
    return api_error_for(exc) or internal_error(exc)


def install_exception_handlers(app: FastAPI) -> None:
    """Route validation errors, ValueErrors, HTTP exceptions and APIErrors to OpenAI bodies."""

    async def handle(request, exc):
        return error_response(to_api_error(exc))

    for exc_type in (APIError, RequestValidationError, ValidationError, ValueError,
                     StarletteHTTPException, EngineOverloadedError, EngineUnavailableError,
                     RequestTimeoutError):
        app.add_exception_handler(exc_type, handle)
