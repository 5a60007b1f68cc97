"""The OpenAI ingress deployment: FastAPI inside Serve, talking to the LLMServer replicas
through a DeploymentHandle whose router is raylm.dp.router.DPRouter."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

import ray
from fastapi import FastAPI
from fastapi.responses import Response

from raylm.engine.llm_engine import tokenizer_and_max_len
from raylm.outputs import merge_delta
from raylm.serve.engine_client import EngineClient
from raylm.dp.coordinator import GONE_FROM_TABLE_S
from raylm.dp.metrics import publish_lockstep
from raylm.exceptions import EngineUnavailableError
from raylm.serve.admission import Admission
from raylm.serve.errors import APIError
from raylm.serve.output_channel import OutputReceiver
from raylm.serve.metrics import PromSink, RequestTimer, publish_engine_stats
from raylm.serve.middleware import OPEN_PATHS

logger = logging.getLogger(__name__)

RANK_WAIT_S = 5  # how long a request pinned to a rank not (yet) in the load table waits for it


_CALL_ENDED = object()  # queued when the replica's Serve call returns or fails
LOST_OUTPUT_WAIT_S = 30.0  # after the call returned, how long its last output may still take


async def _result(call):
    return await call


def _retrieve(done: asyncio.Future) -> None:
    """Mark a finished call's error as seen (the stream raised it, or no longer cares)."""
    if not done.cancelled():
        done.exception()


async def _last(queue: asyncio.Queue, done: asyncio.Future):
    """The next output once the replica's call has ended: its error if it failed, else what
    is still on its way over the channel (sent before the call returned)."""
    if done.exception() is not None:
        raise done.exception()
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), LOST_OUTPUT_WAIT_S)
        except asyncio.TimeoutError:
            raise EngineUnavailableError("the engine replica finished the request but its last "
                                         "outputs never arrived") from None
        if item is not _CALL_ENDED:
            return item


class ServeEngineClient(EngineClient):
    """EngineClient over Serve: streams from whichever replica the router picks."""

    def __init__(self, handle, model_name: str, tokenizer, max_model_len: int,
                 sink: Optional[PromSink], admission: Optional[Admission] = None) -> None:
        self.unary = handle
        self.outputs = OutputReceiver(ray.util.get_node_ip_address())
        self.model_name, self.tokenizer, self.max_model_len = model_name, tokenizer, max_model_len
        self.sink = sink
        self.admission = admission or Admission(max_ongoing_requests=1 << 30)
        self._coordinator = None
        self.tp_size, self.num_experts = 1, 0  # set by the ingress (the scale-size check)
        self.max_dp_size = 1  # replicas the app may run (data_parallel_size), set by the ingress

    @property
    def num_inflight(self) -> int:
        """generate() streams open here (elastic scaling and shutdown drain them)."""
        return self.admission.ongoing

    async def coordinator(self):
        if self._coordinator is None:
            name, namespace = await self.unary.coordinator_info.remote()
            self._coordinator = ray.get_actor(name, namespace=namespace)
        return self._coordinator

    async def generate(self, prompt_token_ids, params, request_id,
                       data_parallel_rank: Optional[int] = None):
        """Cumulative outputs (what the OpenAI layer reads), rebuilt from the deltas the
        replica streams: a step then costs each request O(new tokens) to pickle, not O(all).
        `data_parallel_rank` (or the request's X-data-parallel-rank) pins one replica."""
        from raylm.serve.elastic import dp_rank_hint

        rank = dp_rank_hint.get() if data_parallel_rank is None else data_parallel_rank
        if rank is not None:
            await self._check_rank(rank)
        wants_delta = params.output_kind == "delta"
        stream = self._stream(prompt_token_ids, replace(params, output_kind="delta"), request_id,
                              rank, wants_delta)
        async with aclosing(self.admission.guard(stream)) as guarded:
            async for out in guarded:
                yield out

    async def _check_rank(self, rank: int) -> None:
        """400 for a rank the app cannot have; 503 for one that is not serving now (its replica
        crashed and is being replaced, or the app is scaled below it)."""
        ranks = await self._live_ranks()
        most = max(self.max_dp_size, len(ranks))
        if not 0 <= rank < most:
            raise APIError(400,
                           f"data_parallel_rank {rank} is out of range: the app has at most "
                           f"{most} DP replicas", param="data_parallel_rank")
        for _ in range(RANK_WAIT_S * 4):  # a replica that just started may not have reported yet
            if rank in ranks:
                return
            await asyncio.sleep(0.25)
            ranks = await self._live_ranks()
        raise EngineUnavailableError(f"DP rank {rank} is not serving right now (live ranks: "
                                     f"{sorted(ranks)})")

    async def _live_ranks(self) -> set:
        return {s.get("dp_rank") for s in await self.stats()}

    async def _stream(self, prompt_token_ids, params, request_id, rank, wants_delta):
        """Send the request through Serve (its router picks the replica); read its outputs
        from this ingress's output channel. The Serve call ends after the last output was
        sent; an error in it (bad input, a dead replica) ends the stream with that error."""
        channel = await self.outputs.address()
        key, queue = self.outputs.open()
        call = self.unary.generate.remote(channel, key, prompt_token_ids=prompt_token_ids,
                                          params=params, request_id=request_id,
                                          data_parallel_rank=rank)  # the router reads them
        done = asyncio.ensure_future(_result(call))
        done.add_done_callback(lambda _: queue.put_nowait(_CALL_ENDED))
        done.add_done_callback(_retrieve)
        timer = (RequestTimer(self.sink, self.model_name, len(prompt_token_ids),
                              deltas=wants_delta)
                 if self.sink else None)
        acc, finished = None, False
        try:
            while not finished:
                delta = await (queue.get() if not done.done() else _last(queue, done))
                if delta is _CALL_ENDED:
                    continue
                out = delta if wants_delta else (acc := merge_delta(acc, delta))
                if timer is not None:
                    timer.update(out, out.metrics.get("dp_rank", 0))
                finished = out.finished
                yield out
        finally:
            self.outputs.close(key)
            if not finished and not done.done():
                # client gone or error: the replica aborts the request, frees its blocks
                call.cancel()
                done.cancel()

    async def check_health(self) -> None:
        if self.admission.draining:
            raise EngineUnavailableError("The server is shutting down.")
        await self.unary.check_health.remote()

    async def stats(self) -> List[Dict[str, Any]]:
        """Every replica's latest load, from the DP coordinator's table."""
        _, table = await (await self.coordinator()).snapshot.remote(-1, 0.0)
        now = time.time()  # a replica killed without a goodbye stays in the table: leave it out
        live = [s for s in table.values() if now - s.get("reported_at", now) < GONE_FROM_TABLE_S]
        return sorted(live, key=lambda s: s.get("dp_rank", 0))

    async def control(self) -> Dict[str, Any]:
        """The coordinator's group/wave/scaling state."""
        return await (await self.coordinator()).control.remote()


def add_metrics_route(app: FastAPI, client: EngineClient, sink: PromSink) -> None:
    last: Dict[str, Dict] = {}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        try:
            stats = await client.stats()
            publish_engine_stats(sink, client.model_name, stats, last)
            control = await client.control()
            if control["target"] is not None:  # an expert-parallel (lockstep) app
                publish_lockstep(sink, control, stats)
        except Exception as exc:  # a scrape during a restart still returns the request metrics
            logger.warning("engine stats unavailable for /metrics: %s", exc)
        return Response(sink.render(), media_type="text/plain; version=0.0.4")


def num_experts(model: str) -> int:
    """Experts per MoE layer of `model` (0 for dense models)."""
    from raylm.models.loader import load_hf_config, resolve_model_path

    config = load_hf_config(resolve_model_path(model))
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
               or 0)


class OpenAIIngress:
    """Serve deployment class; wrapped with serve.ingress() (app built at replica init).

    Besides HTTP, Python callers use it through a Serve handle (see README):
        handle = serve.get_app_handle("raylm")
        out = await handle.generate.remote("The capital of France is", {"max_tokens": 8,
        "temperature": 0}) async for out in
        handle.options(stream=True).generate_stream.remote(prompt, params): ...
    Prompts are text or token ids; params are SamplingParams fields. Outputs are RequestOutputs.
    """

    def __init__(self, llm_handle, engine_config: Dict[str, Any], model_name: str, *,
                 api_key: Optional[str] = None, max_body_bytes: int = 1 << 20,
                 max_ongoing_requests: int = 1024, request_timeout: Optional[float] = None,
                 open_paths: Sequence[str] = OPEN_PATHS, admin_api_key: Optional[str] = None,
                 scale_limits: Optional[Dict[str, Any]] = None, autoscaling: bool = False,
                 tool_call_parser: str = "hermes") -> None:
        from ray import serve

        from raylm.serve.elastic import ElasticScaler, ScaleLimits

        tokenizer, max_len = tokenizer_and_max_len(engine_config["model"])
        self.sink = PromSink()
        admission = Admission(max_ongoing_requests, request_timeout)
        self.client = ServeEngineClient(llm_handle, model_name, tokenizer, max_len, self.sink,
                                        admission)
        self.client.tp_size = engine_config["parallel"]["tensor_parallel_size"]
        self.client.max_dp_size = engine_config["parallel"]["data_parallel_size"]
        self.client.num_experts = num_experts(engine_config["model"]["model"])
        self.api_key, self.max_body_bytes, self.open_paths = api_key, max_body_bytes, open_paths
        self.admin_api_key, self.tool_call_parser = admin_api_key, tool_call_parser
        self.scaler = ElasticScaler(self.client, serve.get_replica_context().app_name,
                                    ScaleLimits(**(scale_limits or {})))
        if not autoscaling:  # a fixed dp: the replica count to roll back to
            self.scaler.target = self.client.max_dp_size

    def __serve_build_asgi_app__(self):
        from raylm.serve.elastic import ScaleGuardMiddleware, add_elastic_routes
        from raylm.serve.openai_app import create_app

        app = create_app(self.client, api_key=self.api_key, max_body_bytes=self.max_body_bytes,
                         open_paths=self.open_paths, admin_api_key=self.admin_api_key,
                         tool_call_parser=self.tool_call_parser,
                         middleware=[(ScaleGuardMiddleware, {"scaler": self.scaler})])
        add_metrics_route(app, self.client, self.sink)
        # admin routes exist only with their own key (README: elastic scaling)
        if self.admin_api_key:
            add_elastic_routes(app, self.scaler)
        return app

    async def drain(self, timeout_s: float) -> int:
        """Graceful shutdown: new requests get 503, those in flight may finish for up to
        `timeout_s`; the rest are then cut off with an error. Returns how many were cut off."""
        cut = await self.client.admission.drain(timeout_s)
        logger.info("drained for shutdown: %d request(s) cut off after %.0f s", cut, timeout_s)
        return cut

    async def generate(self, prompt, params: Optional[Dict[str, Any]] = None,
                       request_id: Optional[str] = None, data_parallel_rank: Optional[int] = None):
        """The finished RequestOutput for one prompt (text or token ids)."""
        last = None
        async for last in self.generate_stream(prompt, params, request_id, data_parallel_rank):
            pass
        return last

    async def generate_stream(self, prompt, params: Optional[Dict[str, Any]] = None,
                              request_id: Optional[str] = None,
                              data_parallel_rank: Optional[int] = None):
        """Cumulative RequestOutputs for one prompt; closing the stream aborts the request.
        `data_parallel_rank` pins the request to one DP replica."""
        import uuid

        from raylm.sampling_params import SamplingParams

        ids = self.client.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sampling = SamplingParams(**(params or {}))
        if not ids or len(ids) >= self.client.max_model_len:
            raise ValueError(f"prompt must have 1..{self.client.max_model_len - 1} tokens (got "
                             f"{len(ids)})")
        if self.scaler.guarding:
            raise RuntimeError("the app is scaling (POST /scale_elastic_ep); retry shortly")
        async for out in self.client.generate(ids, sampling,
                                              request_id or f"py-{uuid.uuid4().hex}",
                                              data_parallel_rank):
            out.prompt = prompt if isinstance(prompt, str) else None
            yield out
