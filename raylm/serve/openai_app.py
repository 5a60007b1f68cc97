"""The OpenAI-compatible FastAPI app over any EngineClient (in-process engine or Serve handles).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /version, POST /tokenize, POST /detokenize. More routers (e.g. /metrics) can be added
with `app.include_router(...)`; `app.state.serving` holds the shared ServingContext.

Every non-2xx answer has OpenAI's error shape. Request order: catch-all errors -> API key
(if set; /health, /ping and /version stay open unless configured otherwise) -> body size limit ->
FastAPI (validation) -> handler. A client that disconnects cancels its handler or stream, which
closes the engine iterators and so aborts the requests (their KV blocks are freed).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from raylm.serve.chat import create_chat_completion
from raylm.serve.completions import create_completion
from raylm.serve.context import ServingContext, check_text
from raylm.serve.engine_client import EngineClient
from raylm.serve.errors import error_response, install_exception_handlers, unavailable
from raylm.serve.middleware import (OPEN_PATHS, AdminKeyMiddleware, ApiKeyMiddleware,
                                    BodyLimitMiddleware, CatchAllMiddleware)
from raylm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                  TokenizeResponse)
from raylm.serve.streaming import run_until_disconnect

logger = logging.getLogger(__name__)


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


async def _respond(request: Request, work) -> Response:
    """Await a handler's work (cancelled if the client leaves); pydantic results become JSON."""
    result = await run_until_disconnect(request, work)
    return result if isinstance(result, Response) else _json(result)


def openai_router(ctx: ServingContext) -> APIRouter:
    """/v1/models, /v1/completions, /v1/chat/completions."""
    router = APIRouter(prefix="/v1")

    @router.api_route("/models", methods=["GET", "HEAD"])
    async def list_models() -> JSONResponse:
        cards = [ModelCard(id=name, root=ctx.client.model_name, max_model_len=ctx.max_model_len)
                 for name in ctx.model_names]
        return _json(ModelList(data=cards))

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(request, create_completion(ctx, body))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, create_chat_completion(ctx, body))

    return router


def utility_router(ctx: ServingContext) -> APIRouter:
    """/health, /version, /tokenize, /detokenize (vLLM's paths)."""
    router = APIRouter()

    @router.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD too
    async def health() -> Response:
        try:
            await ctx.client.check_health()
        except Exception as exc:  # noqa: BLE001 - any failure means "do not route here"
            logger.warning("health check failed: %r", exc)
            return error_response(unavailable(f"The engine is unhealthy: {exc}"))
        return Response(status_code=200)

    @router.api_route("/version", methods=["GET", "HEAD"])
    async def version() -> JSONResponse:
        from raylm import __version__

        return JSONResponse({"version": __version__})

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        ctx.resolve_model(body.model)
        if body.messages is not None:
            ids = ctx.apply_chat_template([m.to_template_dict() for m in body.messages],
                                          body.add_generation_prompt)
        else:
            ids = list(ctx.tokenizer.encode(check_text(body.prompt, "prompt"),
                                            add_special_tokens=body.add_special_tokens))
        return _json(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len))

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        ctx.resolve_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        return _json(DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens)))

    return router


def create_app(client: EngineClient, *, api_key: Optional[str] = None,
               max_body_bytes: int = 1 << 20, served_model_names: Optional[Iterable[str]] = None,
               middleware: Sequence = (), open_paths: Iterable[str] = OPEN_PATHS,
               admin_api_key: Optional[str] = None, tool_call_parser: str = "hermes") -> FastAPI:
    """An OpenAI-compatible app over `client`.

    api_key: when set, every route but `open_paths` (default /health, /ping, /version)
    requires `Authorization: Bearer <api_key>` (401 otherwise). max_body_bytes: larger request
    bodies get 413. served_model_names: extra names (aliases) that requests may use besides
    `client.model_name`; any other `model` gets 404. middleware: (class, kwargs) pairs of
    ASGI middleware to run after the API key and body checks (innermost first).
    admin_api_key: the key of the admin routes (ADMIN_PATHS: elastic scaling), which the
    caller adds only when it has one. The inference key never opens them, the admin key only them.
    tool_call_parser: how tool calls are read out of the model's text (raylm.serve.tool_parsers).
    """
    from raylm import __version__

    ctx = ServingContext(client, served_model_names, tool_call_parser)
    app = FastAPI(title="raylm OpenAI-compatible server", version=__version__)
    app.state.serving = ctx
    install_exception_handlers(app)
    app.include_router(openai_router(ctx))
    app.include_router(utility_router(ctx))
    # add_middleware wraps: the last added runs first.
    for cls, kwargs in middleware:
        app.add_middleware(cls, **kwargs)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, open_paths=open_paths)
    app.add_middleware(AdminKeyMiddleware, admin_api_key=admin_api_key)
    app.add_middleware(CatchAllMiddleware)
    return app
