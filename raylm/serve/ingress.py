"""The OpenAI ingress deployment: FastAPI inside Serve, talking to the LLMServer replicas
through a DeploymentHandle whose router is raylm.dp.router.LeastLoadedRouter."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, List, Optional

import ray
from fastapi import FastAPI
from fastapi.responses import Response

from raylm.engine.llm_engine import tokenizer_and_max_len
from raylm.outputs import merge_delta
from raylm.serve.engine_client import EngineClient
from raylm.serve.metrics import PromSink, RequestTimer, publish_engine_stats

logger = logging.getLogger(__name__)


class ServeEngineClient(EngineClient):
    """EngineClient over Serve: streams from whichever replica the router picks."""

    def __init__(self, handle, model_name: str, tokenizer, max_model_len: int, sink: Optional[PromSink]) -> None:
        self.handle = handle.options(stream=True)
        self.unary = handle
        self.model_name, self.tokenizer, self.max_model_len = model_name, tokenizer, max_model_len
        self.sink = sink
        self._coordinator = None

    async def generate(self, prompt_token_ids, params, request_id):
        """Cumulative outputs (what the OpenAI layer reads), rebuilt from the deltas the
        replica streams: a step then costs each request O(new tokens) to pickle, not O(all)."""
        wants_delta = params.output_kind == "delta"
        stream = self.handle.generate.remote(prompt_token_ids, replace(params, output_kind="delta"), request_id)
        timer = (RequestTimer(self.sink, self.model_name, len(prompt_token_ids), deltas=wants_delta)
                 if self.sink else None)
        acc = None
        try:
            async for delta in stream:
                out = delta if wants_delta else (acc := merge_delta(acc, delta))
                if timer is not None:
                    timer.update(out, out.metrics.get("dp_rank", 0))
                yield out
        finally:
            stream.cancel()  # client gone or error: the replica aborts the request and frees its blocks

    async def check_health(self) -> None:
        await self.unary.check_health.remote()

    async def stats(self) -> List[Dict[str, Any]]:
        """Every replica's latest load, from the DP coordinator's table."""
        if self._coordinator is None:
            name, namespace = await self.unary.coordinator_info.remote()
            self._coordinator = ray.get_actor(name, namespace=namespace)
        _, table = await self._coordinator.snapshot.remote(-1, 0.0)
        return sorted(table.values(), key=lambda s: s.get("dp_rank", 0))


def add_metrics_route(app: FastAPI, client: EngineClient, sink: PromSink) -> None:
    last: Dict[str, Dict] = {}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        try:
            publish_engine_stats(sink, client.model_name, await client.stats(), last)
        except Exception as exc:  # a scrape during a restart still returns the request metrics
            logger.warning("engine stats unavailable for /metrics: %s", exc)
        return Response(sink.render(), media_type="text/plain; version=0.0.4")


class OpenAIIngress:
    """Serve deployment class; wrapped with serve.ingress() (app built at replica init).

    Besides HTTP, Python callers use it through a Serve handle (see README):
        handle = serve.get_app_handle("raylm")
        out = await handle.generate.remote("The capital of France is", {"max_tokens": 8, "temperature": 0})
        async for out in handle.options(stream=True).generate_stream.remote(prompt, params): ...
    Prompts are text or token ids; params are SamplingParams fields. Outputs are RequestOutputs.
    """

    def __init__(self, llm_handle, engine_config: Dict[str, Any], model_name: str,
                 api_key: Optional[str] = None, max_body_bytes: int = 1 << 20) -> None:
        tokenizer, max_len = tokenizer_and_max_len(engine_config["model"])
        self.sink = PromSink()
        self.client = ServeEngineClient(llm_handle, model_name, tokenizer, max_len, self.sink)
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def __serve_build_asgi_app__(self):
        from raylm.serve.openai_app import create_app

        app = create_app(self.client, api_key=self.api_key, max_body_bytes=self.max_body_bytes)
        add_metrics_route(app, self.client, self.sink)
        return app

    async def generate(self, prompt, params: Optional[Dict[str, Any]] = None, request_id: Optional[str] = None):
        """The finished RequestOutput for one prompt (text or token ids)."""
        last = None
        async for last in self.generate_stream(prompt, params, request_id):
            pass
        return last

    async def generate_stream(self, prompt, params: Optional[Dict[str, Any]] = None,
                              request_id: Optional[str] = None):
        """Cumulative RequestOutputs for one prompt; closing the stream aborts the request."""
        import uuid

        from raylm.sampling_params import SamplingParams

        ids = self.client.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sampling = SamplingParams(**(params or {}))
        if not ids or len(ids) >= self.client.max_model_len:
            raise ValueError(f"prompt must have 1..{self.client.max_model_len - 1} tokens (got {len(ids)})")
        async for out in self.client.generate(ids, sampling, request_id or f"py-{uuid.uuid4().hex}"):
            out.prompt = prompt if isinstance(prompt, str) else None
            yield out
